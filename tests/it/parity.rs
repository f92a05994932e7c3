//! Parity of the burn towers with the reference implementations, on both CPU
//! backends: relative L2 error ≤ 1e-4 on every tensor of the fixtures.

use crate::common;

use burn::prelude::*;
use common::{Fixture, TOLERANCE, cache, record, rel_l2};
use marquee::backend::Backend;
use marquee::model::towers::{Form, Towers};
use marquee::nn::bert::mean_pool_normalize;
use marquee::preprocess::image::{center_crop_resize, decode, to_chw};
use marquee::preprocess::text::pad_batch;

#[cfg(not(feature = "wgpu"))]
const ALL: [Backend; 2] = [Backend::Flex, Backend::Ndarray];
/// With the feature, the GPU too (lavapipe on a CPU-only machine: README, "The GPU backend").
#[cfg(feature = "wgpu")]
const ALL: [Backend; 3] = [Backend::Flex, Backend::Ndarray, Backend::Wgpu];

/// The backends built in, or those named in `MARQUEE_PARITY_BACKENDS` (comma-separated):
/// tests/gpu-check.sh names only wgpu, in a build whose CPU backends are unoptimised
/// (the release run checks those).
fn backends() -> Vec<Backend> {
    match std::env::var("MARQUEE_PARITY_BACKENDS") {
        Ok(names) => ALL
            .into_iter()
            .filter(|b| names.split(',').any(|n| n.trim() == b.name()))
            .collect(),
        Err(_) => ALL.to_vec(),
    }
}

fn host(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn check(backend: Backend, name: &str, got: &[f32], want: &[f32]) {
    let err = rel_l2(got, want);
    record(backend.name(), name, err);
    assert!(
        err <= TOLERANCE,
        "{}: {name} rel L2 {err:.3e} > {TOLERANCE:e}",
        backend.name()
    );
}

fn rows(data: &[f32], shape: &[usize], range: std::ops::Range<usize>) -> Vec<f32> {
    let per: usize = shape[1..].iter().product();
    data[range.start * per..range.end * per].to_vec()
}

#[test]
fn efficientnet_matches_reference() {
    let fx = Fixture::open("efficientnet_lite0.safetensors");
    let input = fx.get("input");
    for backend in backends() {
        let device = backend.device().unwrap();
        let towers = Towers::load(&cache(), &device, Form::Modules).unwrap();
        let net = &towers.image;
        let x = Tensor::<4>::from_data(
            TensorData::new(input.f32.clone(), input.shape.clone()),
            &device,
        );

        let stem = fx.get("stem");
        check(
            backend,
            "stem",
            &host(net.stem(x.clone().slice(0..2))),
            &stem.f32,
        );

        for n in [0usize, 2, 4, 7, 10, 14, 15] {
            let want = fx.get(&format!("block{n}_out"));
            let got = host(net.forward_until(x.clone().slice(0..1), n));
            check(backend, &format!("block{n}_out"), &got, &want.f32);
        }

        // The folded token-layout kernels that serve on the CPU backends.
        if let Some(lite) = &towers.image_host {
            let [_, _, h, w] = x.dims();
            let mut got = Vec::new();
            for image in input.f32.chunks_exact(3 * h * w) {
                let (tokens, fh, fw) = lite.tokens(image, h, w);
                let cells = fh * fw;
                // Tokens `[cells, C]` to the fixture's `[C, h, w]`.
                let c = tokens.len() / cells;
                got.extend((0..c * cells).map(|i| tokens[(i % cells) * c + i / cells]));
            }
            check(
                backend,
                "features (host kernels)",
                &got,
                &fx.get("features").f32,
            );
        }

        let out = net.forward_features(x);
        check(
            backend,
            "features",
            &host(out.features),
            &fx.get("features").f32,
        );
        let pooled = out.pooled.clone().into_data().try_to_vec::<f32>().unwrap();
        check(backend, "pooled", &pooled, &fx.get("pooled").f32);
        let logits = net
            .classify(out.pooled)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let want = fx.get("logits");
        check(backend, "logits", &logits, &want.f32);

        // Top-1: tiger cat (282) and espresso (967), as the reference reports.
        let argmax = |r: usize| {
            let row = &logits[r * 1000..(r + 1) * 1000];
            (0..1000)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap()
        };
        assert_eq!((argmax(0), argmax(1)), (282, 967));
    }
}

#[test]
fn minilm_matches_reference() {
    let fx = Fixture::open("minilm_l6.safetensors");
    for backend in backends() {
        let device = backend.device().unwrap();
        let towers = Towers::load(&cache(), &device, Form::Modules).unwrap();
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(common::shared().join("reference/minilm_l6.json")).unwrap(),
        )
        .unwrap();
        let sentences = json["sentences"].as_array().expect("sentences");
        let (mut worst_h, mut worst_e) = (0f64, 0f64);
        for (i, s) in sentences.iter().enumerate() {
            let text = s
                .as_str()
                .or_else(|| s["text"].as_str())
                .expect("sentence text");
            let ids = towers.tokenizer.encode(text).unwrap();
            assert_eq!(
                ids,
                fx.get(&format!("ids_{i}")).i64,
                "token ids of sentence {i}"
            );

            let b = pad_batch(std::slice::from_ref(&ids));
            let idt = Tensor::<2, Int>::from_data(TensorData::new(b.ids, [1, b.len]), &device);
            let mask = Tensor::<2>::from_data(TensorData::new(b.mask, [1, b.len]), &device);
            let hidden = towers.text.forward(idt, mask.clone());
            let emb = mean_pool_normalize(hidden.clone(), mask);
            let hidden = hidden.into_data().try_to_vec::<f32>().unwrap();
            let emb = emb.into_data().try_to_vec::<f32>().unwrap();
            let eh = rel_l2(&hidden, &fx.get(&format!("last_hidden_state_{i}")).f32);
            let ee = rel_l2(&emb, &fx.get(&format!("embedding_{i}")).f32);
            assert!(
                eh <= TOLERANCE && ee <= TOLERANCE,
                "sentence {i}: hidden {eh:.3e} embedding {ee:.3e}"
            );
            worst_h = worst_h.max(eh);
            worst_e = worst_e.max(ee);
        }
        record(backend.name(), "last_hidden_state (worst)", worst_h);
        record(backend.name(), "embedding (worst)", worst_e);

        // The padded batch, as training extracts it: right-padded ids with their mask.
        let texts: Vec<&str> = sentences
            .iter()
            .map(|s| s.as_str().or_else(|| s["text"].as_str()).unwrap())
            .collect();
        let batch = towers.tokenizer.encode_batch(&texts).unwrap();
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(batch.ids, [batch.rows, batch.len]),
            &device,
        );
        let mask = Tensor::<2>::from_data(
            TensorData::new(batch.mask, [batch.rows, batch.len]),
            &device,
        );
        let hidden = towers.text.forward(ids, mask.clone());
        let got = mean_pool_normalize(hidden, mask)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        check(
            backend,
            "batch_embeddings",
            &got,
            &fx.get("batch_embeddings").f32,
        );
    }
}

#[test]
fn preprocessing_matches_reference_within_a_few_levels() {
    // The fixture's input encodes u8 pixels exactly: p = x * 128 + 127.
    let fx = Fixture::open("efficientnet_lite0.safetensors");
    let input = fx.get("input");
    let root = common::shared().join("data/posters-v1/posters");
    for (k, id) in [
        (2usize, "projetmovie-tt3501632"),
        (3, "projetmovie-tt2380307"),
    ] {
        let bytes = std::fs::read(root.join(format!("{id}.jpg"))).unwrap();
        let img = center_crop_resize(&decode(&bytes).unwrap(), 224);
        let got = to_chw(&img);
        let want = rows(&input.f32, &input.shape, k..k + 1);
        let levels: Vec<f32> = got
            .iter()
            .zip(&want)
            .map(|(g, w)| ((g - w) * 128.0).abs())
            .collect();
        let max = levels.iter().cloned().fold(0.0, f32::max);
        let mean = levels.iter().sum::<f32>() / levels.len() as f32;
        // JPEG decoders differ by up to 4 levels before resizing (reference README).
        assert!(
            max <= 12.0 && mean <= 1.0,
            "{id}: max {max} mean {mean} u8 levels"
        );
    }
}

#[test]
fn every_dataset_poster_passes_the_strict_decoder() {
    // Strict JPEG decoding must not refuse real-world posters.
    let dir = common::shared().join("data/posters-v1/posters");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let img = decode(&std::fs::read(&p).unwrap())
            .unwrap_or_else(|err| panic!("{}: {err}", p.display()));
        assert!(img.width() >= 100 && img.height() >= 100);
        n += 1;
    }
    assert!(n > 10_000, "{n} posters");
}

/// The shipped model scores the same on wgpu as on flex (served on the host kernels):
/// the example poster and three val posters, each with and without its overview.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_scores_equal_flex() {
    use marquee::infer::Classifier;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = root.join("models");
    let flex = Classifier::load(&models, &cache(), &Backend::Flex.device().unwrap()).unwrap();
    let gpu = Classifier::load(&models, &cache(), &Backend::Wgpu.device().unwrap()).unwrap();
    let data = common::shared().join("data/posters-v1");
    let manifest = std::fs::read_to_string(data.join("movies.jsonl")).unwrap();
    let mut posters: Vec<(std::path::PathBuf, Option<String>)> =
        vec![(root.join("examples/poster.png"), None)];
    for line in manifest
        .lines()
        .filter(|l| l.contains("\"split\": \"val\""))
        .take(3)
    {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let overview = row["overview"].as_str().map(str::to_string);
        posters.push((data.join(row["poster"].as_str().unwrap()), overview));
    }
    for (path, overview) in &posters {
        let img = decode(&std::fs::read(path).unwrap()).unwrap();
        let texts = match overview {
            Some(o) => vec![None, Some(o.as_str())],
            None => vec![None],
        };
        for text in texts {
            let score = |c: &Classifier| -> Vec<f32> {
                let p = c.classify(&img, text, None).unwrap();
                let mut g = p.genres;
                g.sort_by(|a, b| a.label.cmp(&b.label));
                g.into_iter().map(|s| s.score).collect()
            };
            let (want, got) = (score(&flex), score(&gpu));
            let name = format!("scores {} text={}", path.display(), text.is_some());
            check(Backend::Wgpu, &name, &got, &want);
        }
    }
}
