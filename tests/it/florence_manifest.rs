//! The full-size Florence-2 manifests (base and large, both layouts) against our burn
//! model, with no weights: every checkpoint key lands on a parameter of the right shape
//! after the loader's remap and adapters, nothing is left over, and only the keys a
//! layout is known to carry (tied aliases, Microsoft's zero logits bias) are dropped.

use crate::common;

use common::shared;
use marquee::backend::Backend;
use marquee::model::florence::{Layout, adapted_shape, parameter_shapes};
use marquee::nn::florence::Florence2;
use marquee::nn::florence::config::FlorenceConfig;
use std::collections::BTreeSet;

struct Row {
    key: String,
    shape: Vec<usize>,
    kind: String,
}

fn manifest(file: &str) -> Vec<Row> {
    let path = shared().join("reference/florence2").join(file);
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Row {
                key: f[0].to_string(),
                shape: serde_json::from_str(f[1]).unwrap(),
                kind: f[2].to_string(),
            }
        })
        .collect()
}

fn check(config: FlorenceConfig, file: &str, layout: Layout, dropped_saved: &[&str]) {
    // Lazy parameters: building the full-size model allocates no weights.
    let model = Florence2::new(&config, &Backend::Flex.device().unwrap());
    let params = parameter_shapes(&model);
    let vocab = config.text_config.vocab_size;
    let mut covered = BTreeSet::new();
    let mut dropped = Vec::new();
    for row in manifest(file) {
        let path = layout.burn_path(&row.key);
        if let Some(rest) = path.strip_prefix("dropped.") {
            if !row.kind.starts_with("tied->") {
                dropped.push(rest.to_string());
            }
            continue;
        }
        assert!(
            !row.kind.starts_with("tied->"),
            "{file}: tied alias {} should be dropped, maps to {path}",
            row.key
        );
        let (shape, linear) = params
            .get(&path)
            .unwrap_or_else(|| panic!("{file}: {} -> {path}: no such parameter", row.key));
        assert_eq!(
            &adapted_shape(layout, &path, &row.shape, *linear, vocab),
            shape,
            "{file}: {} -> {path}",
            row.key
        );
        assert!(covered.insert(path.clone()), "{file}: {path} filled twice");
    }
    let left: Vec<&String> = params.keys().filter(|k| !covered.contains(*k)).collect();
    assert!(left.is_empty(), "{file}: parameters no key fills: {left:?}");
    assert_eq!(dropped, dropped_saved, "{file}: dropped saved keys");
    println!("{file}: {} parameters covered", covered.len());
}

#[test]
fn base_manifests_map_onto_the_model() {
    check(
        FlorenceConfig::base(),
        "base_keys_native.txt",
        Layout::Native,
        &[],
    );
    check(
        FlorenceConfig::base(),
        "base_keys_microsoft.txt",
        Layout::Microsoft,
        &["final_logits_bias"],
    );
}

#[test]
fn large_manifests_map_onto_the_model() {
    check(
        FlorenceConfig::large(),
        "large_keys_native.txt",
        Layout::Native,
        &[],
    );
    check(
        FlorenceConfig::large(),
        "large_keys_microsoft.txt",
        Layout::Microsoft,
        &["final_logits_bias"],
    );
}

#[test]
fn mapping_table_agrees_with_the_remap() {
    // The kit's own Microsoft -> native table: our path for the Microsoft key must equal
    // our path for the native key it names.
    for file in [
        "base_key_mapping_microsoft_to_native.tsv",
        "large_key_mapping_microsoft_to_native.tsv",
    ] {
        let text =
            std::fs::read_to_string(shared().join("reference/florence2").join(file)).unwrap();
        let mut rows = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split('\t').collect();
            if f[2] == "-" {
                continue;
            }
            let ms = Layout::Microsoft.burn_path(f[0]);
            let native = Layout::Native.burn_path(f[2]);
            if native.starts_with("dropped.") {
                assert!(ms.starts_with("dropped."), "{file}: {} vs {}", f[0], f[2]);
            } else {
                assert_eq!(ms, native, "{file}: {} vs {}", f[0], f[2]);
            }
            rows += 1;
        }
        assert!(rows > 600, "{file}: only {rows} rows");
    }
}
