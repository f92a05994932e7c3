//! The shipped model in models/: self-contained, within its size budget, and as
//! accurate on val as its card says, run the way a fresh clone runs it (no cache).

use crate::common;

use marquee::model::towers::{Form, Towers};
use marquee::preprocess::text::TextTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The budget for everything in models/.
const MAX_BYTES: u64 = 32_000_000;
/// Val figures of the shipped student, end to end, as its card reports them.
const CARD_MACRO_F1: f64 = 0.6027;
const CARD_TEXT_LESS_MACRO_F1: f64 = 0.4305;
/// The best single-modality model on val (text-only), from the card's ablation table.
const BEST_SINGLE_MODALITY_MACRO_F1: f64 = 0.5151;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

fn spec() -> Value {
    serde_json::from_str(&std::fs::read_to_string(models().join("model.json")).unwrap()).unwrap()
}

#[test]
fn models_folder_is_self_contained_and_within_budget() {
    let total: u64 = std::fs::read_dir(models())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total <= MAX_BYTES, "models/ holds {total} bytes");
    let s = spec();
    assert!(s["towers"]["bundled"].is_object(), "towers must be bundled");
    for f in [
        "model.json",
        "README.md",
        "tokenizer.json",
        "image_tower.safetensors",
        "text_tower.safetensors",
        "fusion_0.bpk",
    ] {
        assert!(models().join(f).is_file(), "models/{f} missing");
    }
    assert_eq!(s["labels"].as_array().unwrap().len(), 18);
    assert_eq!(s["thresholds_text_less"].as_array().unwrap().len(), 18);
}

#[test]
fn bundled_vocabulary_still_reads_every_val_overview() {
    // The pruned vocabulary keeps every single-character piece, so unseen words are
    // spelled out instead of becoming [UNK]: no val text gains an unknown token.
    let full = Towers::load(
        &common::cache(),
        &burn::prelude::Device::flex(),
        Form::Modules,
    )
    .unwrap();
    let pruned = TextTokenizer::from_file(&models().join("tokenizer.json")).unwrap();
    let unk_full = full.tokenizer.encode("[UNK]").unwrap()[1];
    let unk_pruned = pruned.encode("[UNK]").unwrap()[1];
    let manifest = common::shared().join("data/posters-v1/movies.jsonl");
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut checked = 0;
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        let overview = row["overview"].as_str().unwrap();
        if row["split"] != "val" || overview.is_empty() {
            continue;
        }
        let a = full.tokenizer.encode(overview).unwrap();
        let b = pruned.encode(overview).unwrap();
        let unknown = |ids: &[i64], unk| ids.iter().filter(|&&i| i == unk).count();
        assert_eq!(unknown(&a, unk_full), unknown(&b, unk_pruned), "{overview}");
        checked += 1;
    }
    assert!(checked > 500);
}

fn eval(extra: &[&str], empty_cache: &Path) -> Value {
    let manifest = common::shared().join("data/posters-v1/movies.jsonl");
    let mut args = vec![
        "eval",
        "--manifest",
        manifest.to_str().unwrap(),
        "--split",
        "val",
        "--json",
        "--cache",
        empty_cache.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn shipped_student_reproduces_its_card_on_val_from_an_empty_cache() {
    let empty = common::tmpdir("model-empty-cache");
    let v = eval(&[], &empty);
    assert_eq!(v["n"], 698);
    let macro_f1 = v["macro_f1"].as_f64().unwrap();
    assert!(
        (macro_f1 - CARD_MACRO_F1).abs() <= 0.01,
        "macro-F1 {macro_f1} vs the card's {CARD_MACRO_F1}"
    );
    assert!(
        macro_f1 >= BEST_SINGLE_MODALITY_MACRO_F1 + 0.03,
        "early fusion must beat the best single modality by 0.03: {macro_f1}"
    );
    let kiosk = eval(&["--text-less"], &empty);
    let m = kiosk["macro_f1"].as_f64().unwrap();
    assert!(
        (m - CARD_TEXT_LESS_MACRO_F1).abs() <= 0.01,
        "text-less macro-F1 {m} vs the card's {CARD_TEXT_LESS_MACRO_F1}"
    );
    assert!(
        std::fs::read_dir(&empty).unwrap().next().is_none(),
        "nothing fetched"
    );
}

/// A copy of the shipped model with `tta_flip_text_less` set as given.
fn model_with_kiosk_flip(on: bool) -> PathBuf {
    let dir = common::tmpdir(&format!("model-kiosk-flip-{on}"));
    for e in std::fs::read_dir(models()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let mut s = spec();
    s["tta_flip_text_less"] = Value::Bool(on);
    std::fs::write(dir.join("model.json"), s.to_string()).unwrap();
    dir
}

#[test]
fn a_kiosk_scan_averages_the_poster_and_its_mirror_image() {
    use marquee::infer::Classifier;
    use marquee::preprocess::image::decode;
    let device = burn::prelude::Device::flex();
    let load =
        |on| Classifier::load(&model_with_kiosk_flip(on), &common::cache(), &device).unwrap();
    let (plain, kiosk) = (load(false), load(true));
    let scores = |c: &Classifier, img: &image::RgbImage, text: Option<&str>| -> Vec<f32> {
        let mut g = c.classify(img, text, None).unwrap().genres;
        g.sort_by(|a, b| a.label.cmp(&b.label));
        g.into_iter().map(|s| s.score).collect()
    };
    let poster = &crate::common::appliance::posters(1)[0];
    let img = decode(&std::fs::read(poster).unwrap()).unwrap();
    let mirror = image::imageops::flip_horizontal(&img);
    // Without text: the mean of the two views' scores.
    let (a, b) = (scores(&plain, &img, None), scores(&plain, &mirror, None));
    let both = scores(&kiosk, &img, None);
    assert!(
        a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3),
        "the views differ"
    );
    for ((x, y), z) in a.iter().zip(&b).zip(&both) {
        assert!(((x + y) / 2.0 - z).abs() < 1e-5, "{x} {y} -> {z}");
    }
    // With an overview: the poster alone, as before.
    let text = Some("A retired hitman returns for one last job in a city of neon.");
    assert_eq!(scores(&plain, &img, text), scores(&kiosk, &img, text));
}
