//! Florence-2 in burn against the reference kit (`../shared/reference/florence2`):
//! every DaViT stage and block, the projector, the BART encoder, first-step and
//! teacher-forced logits within 1e-4 relative L2; greedy and beam-3 ids identical;
//! the padded batch; both checkpoint layouts; on both CPU backends, and the vision
//! tower also through burn's generic path (the one a GPU takes).

use crate::common;

use burn::prelude::*;
use common::{Fixture, TOLERANCE, record, rel_l2, shared};
use marquee::backend::Backend;
use marquee::caption::local::FlorenceCaptioner;
use marquee::caption::processor::{ImageSize, normalize, resize};
use marquee::infer::captioner::CaptionOptions;
use marquee::infer::task::Task;
use marquee::model::florence::load_weights;
use marquee::nn::florence::Florence2;
use marquee::nn::florence::config::FlorenceConfig;
use marquee::nn::florence::generate::{GenerationConfig, generate};
use std::path::PathBuf;

const BACKENDS: [Backend; 2] = [Backend::Flex, Backend::Ndarray];
const IMAGE_TOKENS: usize = 17;

fn kit() -> PathBuf {
    shared().join("reference/florence2")
}

fn fixture() -> Fixture {
    Fixture::open("florence2/tiny_reference.safetensors")
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn check(backend: Backend, name: &str, got: &[f32], want: &[f32]) {
    let err = rel_l2(got, want);
    record(backend.name(), &format!("florence {name}"), err);
    assert!(
        err <= TOLERANCE,
        "{}: {name} rel L2 {err:.3e} > {TOLERANCE:e}",
        backend.name()
    );
}

fn tensor<const D: usize>(fx: &Fixture, name: &str, device: &Device) -> Tensor<D> {
    let a = fx.get(name);
    let shape: [usize; D] = a.shape.clone().try_into().unwrap();
    Tensor::from_data(TensorData::new(a.f32, shape), device)
}

fn ids_tensor(ids: &[i64], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), shape), device)
}

/// Columns `from..` of a `[rows, cols]` i64 fixture.
fn columns(a: &common::Array, from: usize) -> (Vec<i64>, [usize; 2]) {
    let (rows, cols) = (a.shape[0], a.shape[1]);
    let v = (0..rows)
        .flat_map(|r| a.i64[r * cols + from..(r + 1) * cols].to_vec())
        .collect();
    (v, [rows, cols - from])
}

fn strip_pad(ids: &[i64]) -> Vec<u32> {
    let mut v: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    while v.last() == Some(&1) {
        v.pop();
    }
    v
}

fn reference_ids(fx: &Fixture, name: &str) -> Vec<Vec<u32>> {
    let a = fx.get(name);
    a.i64.chunks(a.shape[1]).map(strip_pad).collect()
}

fn generation(which: &str) -> GenerationConfig {
    let meta = std::fs::read(kit().join("tiny_reference.safetensors")).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&meta).unwrap();
    let gens: serde_json::Value =
        serde_json::from_str(&m.metadata().as_ref().unwrap()["generation"]).unwrap();
    serde_json::from_value(gens[which].clone()).unwrap()
}

/// Merges the image tokens with the fixture's prompt (`{prefix}input_ids` after the
/// image placeholders, with its mask), runs the encoder and the first decoder step,
/// and checks both against `{prefix}encoder_last_hidden_state` and
/// `{prefix}first_step_logits`. Returns the encoder output and mask.
fn encode_and_first_step(
    backend: Backend,
    model: &Florence2,
    image: Tensor<3>,
    fx: &Fixture,
    prefix: &str,
) -> (Tensor<3>, Tensor<2>) {
    let device = image.device();
    let (prompt, shape) = columns(&fx.get(&format!("{prefix}input_ids")), IMAGE_TOKENS);
    let (mask, _) = columns(&fx.get(&format!("{prefix}attention_mask")), IMAGE_TOKENS);
    let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, shape), &device).float();
    let (embeds, mask) = model.merge(image, ids_tensor(&prompt, shape, &device), mask);
    if prefix.is_empty() {
        let want = fx.get("encoder_inputs_embeds").f32;
        check(
            backend,
            "encoder_inputs_embeds",
            &host(embeds.clone()),
            &want,
        );
    }
    let encoded = model.encode(embeds, mask.clone());
    let name = format!("{prefix}encoder_last_hidden_state");
    check(backend, &name, &host(encoded.clone()), &fx.get(&name).f32);
    let mut cache = model.start(encoded.clone(), mask.clone());
    let first = model.decode_logits(ids_tensor(&[2, 2], [2, 1], &device), &mut cache);
    let name = format!("{prefix}first_step_logits");
    check(backend, &name, &host(first), &fx.get(&name).f32);
    (encoded, mask)
}

#[test]
fn tiny_florence_matches_the_reference_tensors_and_ids() {
    let fx = fixture();
    for backend in BACKENDS {
        let device = backend.device().unwrap();
        let cap = FlorenceCaptioner::load(&kit().join("tiny"), &device).unwrap();
        let model = cap.model();
        let pixels: Tensor<4> = tensor(&fx, "pixel_values", &device);

        let mut taps = Vec::new();
        let image = model.encode_image_taps(pixels, Some(&mut taps));
        assert_eq!(
            taps.len(),
            14,
            "4 ConvEmbeds + 5 blocks x (spatial, channel)"
        );
        for (name, t) in taps {
            check(backend, &name, &host(t), &fx.get(&name).f32);
        }
        check(
            backend,
            "image_features",
            &host(image.clone()),
            &fx.get("image_features").f32,
        );

        let (encoded, mask) = encode_and_first_step(backend, model, image, &fx, "");

        let tf = fx.get("teacher_forced_decoder_input_ids");
        let mut cache = model.start(encoded.clone(), mask.clone());
        let logits = model.decode_logits(ids_tensor(&tf.i64, [2, 6], &device), &mut cache);
        check(
            backend,
            "teacher_forced_logits",
            &host(logits),
            &fx.get("teacher_forced_logits").f32,
        );

        // Greedy with Microsoft's processors: ids identical, every step's raw logits close.
        let greedy = generate(
            model,
            encoded.clone(),
            mask.clone(),
            &generation("greedy"),
            true,
        );
        assert_eq!(
            greedy.ids,
            reference_ids(&fx, "greedy_ids"),
            "{}: greedy ids",
            backend.name()
        );
        let steps: Vec<f32> = greedy.step_logits.concat();
        check(
            backend,
            "greedy_step_logits",
            &steps,
            &fx.get("greedy_step_logits").f32,
        );

        let plain = generate(
            model,
            encoded.clone(),
            mask.clone(),
            &generation("greedy_plain"),
            false,
        );
        assert_eq!(
            plain.ids,
            reference_ids(&fx, "greedy_plain_ids"),
            "{}: plain greedy ids",
            backend.name()
        );

        let beam = generate(model, encoded, mask, &generation("beam3"), false);
        assert_eq!(
            beam.ids,
            reference_ids(&fx, "beam3_ids"),
            "{}: beam-3 ids",
            backend.name()
        );
        check(
            backend,
            "beam3_sequences_scores",
            &beam.scores,
            &fx.get("beam3_sequences_scores").f32,
        );

        // The kit's JSON copy of the ids agrees with the tensors.
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(kit().join("expected_ids.json")).unwrap(),
        )
        .unwrap();
        let as_ids = |k: &str| -> Vec<u32> { serde_json::from_value(json[k].clone()).unwrap() };
        assert_eq!(greedy.ids[0], as_ids("astronaut_greedy_20_ids"));
        assert_eq!(beam.ids[1], as_ids("coffee_beam3_20_ids"));
    }
}

#[test]
fn padded_batch_matches_the_reference() {
    let fx = fixture();
    for backend in BACKENDS {
        let device = backend.device().unwrap();
        let cap = FlorenceCaptioner::load(&kit().join("tiny"), &device).unwrap();
        let model = cap.model();
        let image = model.encode_image(tensor(&fx, "pixel_values", &device));
        let pads = fx.get("padded_attention_mask").i64;
        assert!(pads.contains(&0), "the fixture pads one prompt");
        let (encoded, mask) = encode_and_first_step(backend, model, image, &fx, "padded_");
        let greedy = generate(model, encoded, mask, &generation("greedy"), false);
        assert_eq!(
            greedy.ids,
            reference_ids(&fx, "padded_greedy_ids"),
            "{}: padded greedy ids",
            backend.name()
        );
    }
}

fn tiny_config() -> FlorenceConfig {
    FlorenceConfig::from_json(&std::fs::read_to_string(kit().join("tiny/config.json")).unwrap())
        .unwrap()
}

#[test]
fn microsoft_layout_and_window_padding_match() {
    let fx = fixture();
    let device = Backend::Flex.device().unwrap();
    let config = tiny_config();
    let mut ms = Florence2::new(&config, &device);
    load_weights(
        &mut ms,
        &config,
        &kit().join("tiny_model_microsoft.safetensors"),
    )
    .unwrap();
    let pixels: Tensor<4> = tensor(&fx, "pixel_values", &device);
    check(
        Backend::Flex,
        "microsoft image_features",
        &host(ms.encode_image(pixels.clone())),
        &fx.get("image_features").f32,
    );
    let (prompt, shape) = columns(&fx.get("input_ids"), IMAGE_TOKENS);
    let ones = Tensor::ones(shape, &device);
    let (embeds, mask) = ms.merge(
        ms.encode_image(pixels.clone()),
        ids_tensor(&prompt, shape, &device),
        ones,
    );
    let encoded = ms.encode(embeds, mask.clone());
    let mut cache = ms.start(encoded.clone(), mask.clone());
    let first = ms.decode_logits(ids_tensor(&[2, 2], [2, 1], &device), &mut cache);
    check(
        Backend::Flex,
        "microsoft first_step_logits",
        &host(first),
        &fx.get("first_step_logits").f32,
    );
    let beam = generate(&ms, encoded, mask, &generation("beam3"), false);
    assert_eq!(beam.ids, reference_ids(&fx, "beam3_ids"));

    // window 3 on a 4x4 map pads every stage but the first: the padding path.
    let mut w3 = config.clone();
    w3.vision_config.window_size = 3;
    let mut model = Florence2::new(&w3, &device);
    load_weights(&mut model, &w3, &kit().join("tiny/model.safetensors")).unwrap();
    check(
        Backend::Flex,
        "image_features_window3",
        &host(model.encode_image(pixels)),
        &fx.get("image_features_window3").f32,
    );
}

#[test]
fn processor_reproduces_pil_bicubic_within_one_level() {
    let fx = fixture();
    let want = fx.get("pixel_values");
    let per = 3 * 128 * 128;
    for i in 0..2 {
        let raw = fx.get(&format!("image{i}_raw_u8"));
        let img =
            image::RgbImage::from_raw(raw.shape[1] as u32, raw.shape[0] as u32, raw.u8).unwrap();
        let got = normalize(&resize(
            &img,
            ImageSize {
                width: 128,
                height: 128,
            },
        ));
        let std = [0.229f32, 0.224, 0.225];
        let worst = got
            .iter()
            .zip(&want.f32[i * per..(i + 1) * per])
            .enumerate()
            .map(|(j, (g, w))| (g - w).abs() * std[j / (128 * 128)] * 255.0)
            .fold(0f32, f32::max);
        println!("image{i}: worst difference {worst:.3} u8 levels");
        assert!(worst <= 1.0 + 1e-3, "image{i}: {worst} u8 levels off PIL");
    }
    // Upsampling to the real 768 input.
    let raw = fx.get("image1_raw_u8");
    let img = image::RgbImage::from_raw(raw.shape[1] as u32, raw.shape[0] as u32, raw.u8).unwrap();
    let got = resize(&img, ImageSize::FLORENCE);
    let want = fx.get("resized768_pil_u8_image1").u8;
    let worst = got
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    println!("768 upsample: worst difference {worst} u8 levels");
    assert!(worst <= 1, "768 resize: {worst} u8 levels off PIL");
}

#[test]
fn caption_api_runs_end_to_end_on_the_tiny_model() {
    let device = Backend::Flex.device().unwrap();
    let cap = FlorenceCaptioner::load(&kit().join("tiny"), &device).unwrap();
    assert_eq!(
        cap.prompt_ids(Task::Caption).unwrap(),
        vec![0, 493, 602, 266, 344, 871, 34, 2]
    );
    let img = image::open(kit().join("astronaut.png")).unwrap().to_rgb8();
    let out = cap
        .caption(
            &img,
            Task::Caption,
            &CaptionOptions {
                beams: Some(1),
                max_new_tokens: Some(20),
            },
        )
        .unwrap();
    // From the PNG through our processor to text: the reference's greedy ids exactly
    // (its pixel values came from PIL; our resize reproduces them to the level).
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kit().join("expected_ids.json")).unwrap())
            .unwrap();
    let want: Vec<u32> = serde_json::from_value(json["astronaut_greedy_20_ids"].clone()).unwrap();
    assert_eq!(out.ids, want);
    assert_eq!(out.tokens, 20);
    assert!(!out.caption.is_empty());
    assert!(!out.caption.contains("<s>") && !out.caption.contains("</s>"));
}

/// On an autodiff device the CPU kernels of `nn::cpu_ops` step aside, so this runs
/// burn's generic vision path (NCHW convs, window partition with padding), the one a
/// GPU takes, against the same fixtures.
#[test]
fn burns_generic_vision_path_matches_too() {
    let fx = fixture();
    let device = Backend::Flex.device().unwrap().autodiff();
    for (window, want) in [(4, "image_features"), (3, "image_features_window3")] {
        let mut config = tiny_config();
        config.vision_config.window_size = window;
        let mut model = Florence2::new(&config, &device);
        load_weights(&mut model, &config, &kit().join("tiny/model.safetensors")).unwrap();
        let pixels: Tensor<4> = tensor(&fx, "pixel_values", &device);
        check(
            Backend::Flex,
            &format!("generic path {want}"),
            &host(model.encode_image(pixels)),
            &fx.get(want).f32,
        );
    }
}

/// A model folder that would panic at its first caption is refused when it loads,
/// with one line naming the file and the key.
#[test]
fn a_florence_folder_that_would_fail_at_its_first_caption_is_refused_at_load() {
    let device = Backend::Flex.device().unwrap();
    let tiny = kit().join("tiny");
    let dir = common::tmpdir("florence-bad-dirs");
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    let copy = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(&tiny).unwrap().flatten() {
            std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
            let mut perm = std::fs::metadata(d.join(f.file_name()))
                .unwrap()
                .permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(d.join(f.file_name()), perm).unwrap();
        }
        d
    };
    for (key, value, says) in [
        (
            "decoder_start_token_id",
            serde_json::json!(99_999_999),
            "decoder_start_token_id",
        ),
        (
            "forced_bos_token_id",
            serde_json::json!(4_000_000),
            "forced_bos_token_id",
        ),
        ("num_beams", serde_json::json!(5000), "num_beams"),
        (
            "max_new_tokens",
            serde_json::json!(1_000_000),
            "max_new_tokens",
        ),
    ] {
        let d = copy(key);
        let mut g = base.clone();
        g[key] = value;
        std::fs::write(d.join("generation_config.json"), g.to_string()).unwrap();
        let e = FlorenceCaptioner::load(&d, &device).err().expect(key);
        let e = format!("{e:#}");
        assert!(e.contains(says) && !e.contains('\n'), "{key}: {e}");
    }
    // A tokenizer with an empty vocabulary.
    let d = copy("empty-vocab");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tokenizer.json")).unwrap()).unwrap();
    t["model"]["vocab"] = serde_json::json!({});
    t["model"]["merges"] = serde_json::json!([]);
    t["added_tokens"] = serde_json::json!([]);
    std::fs::write(d.join("tokenizer.json"), t.to_string()).unwrap();
    let e = FlorenceCaptioner::load(&d, &device)
        .err()
        .expect("empty vocab");
    assert!(format!("{e:#}").contains("tokenizer"), "{e:#}");
}
