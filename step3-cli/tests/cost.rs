//! `step3 cost` as a user runs it: the paper's numbers through the command line, JSON keys,
//! custom accelerators, the plot, and bad input.

mod common;

use common::*;

fn json(args: &[&str]) -> serde_json::Value {
    let out = step3(args);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

#[test]
fn step3_at_32k_reproduces_the_paper() {
    let out = step3(&["cost", "--preset", "step3", "--context", "32768"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("cheapest AFD: attention on H20 + FFN on H800 = 0.129 USD per 1M tokens"), "{text}");

    let v = json(&["cost", "--preset", "step3", "--context", "32768", "--json"]);
    for key in ["kv_bytes", "attn_flops", "linear_flops", "ffn_flops", "arithmetic_intensity", "activated_params"] {
        assert!(v[key].is_number(), "missing {key}");
    }
    assert_eq!(v["kv_bytes"], 1_023_410_176.0);
    assert_eq!(v["arithmetic_intensity"], 128.0);
    let c = &v["cost_per_1m_tokens"];
    assert_eq!(format!("{:.3}", c["attention"]["H20"].as_f64().unwrap()), "0.114");
    assert_eq!(format!("{:.3}", c["ffn"]["H800"].as_f64().unwrap()), "0.015");
    assert_eq!(c["afd_best"]["attention"], "H20");
    assert_eq!(c["afd_best"]["ffn"], "H800");
    assert_eq!(format!("{:.3}", c["afd_best"]["total"].as_f64().unwrap()), "0.129");
}

#[test]
fn a_chosen_pairing_and_a_restricted_set() {
    let v = json(&[
        "cost",
        "--preset",
        "dsv3",
        "--context",
        "8192",
        "--accel",
        "h800",
        "--attn-accel",
        "h800",
        "--ffn-accel",
        "H800",
        "--json",
    ]);
    let c = &v["cost_per_1m_tokens"];
    assert_eq!(c["attention"].as_object().unwrap().len(), 1);
    assert_eq!(format!("{:.3}", c["pairing"]["total"].as_f64().unwrap()), "0.068");
}

#[test]
fn any_step3_config_works() {
    let config = format!("{}/../configs/step3/config.json", env!("CARGO_MANIFEST_DIR"));
    let a = json(&["cost", "--config", &config, "--context", "8192", "--json"]);
    let b = json(&["cost", "--preset", "step3", "--context", "8192", "--json"]);
    for key in ["kv_bytes", "attn_flops", "linear_flops", "ffn_flops", "activated_params"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    let tiny = fixtures().join("vl-f32/config.json");
    let v = json(&["cost", "--config", tiny.to_str().unwrap(), "--json"]);
    // 4 layers x 2 x head_dim 32 x 1 byte x 8192 tokens.
    assert_eq!(v["kv_bytes"], 4.0 * 64.0 * 8192.0);
}

#[test]
fn custom_accelerators_from_json_and_toml() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("accels.json");
    std::fs::write(&j, r#"[{"name": "MyCard", "usd_per_hour": 1.0, "bf16_flops": 5e14, "fp8_flops": 1e15, "mem_bw": 2e12, "nic_gbps": 400}]"#).unwrap();
    let v = json(&["cost", "--preset", "step3", "--accel-file", j.to_str().unwrap(), "--accel", "mycard", "--json"]);
    assert!(v["cost_per_1m_tokens"]["ffn"]["MyCard"].as_f64().unwrap() > 0.0);
    let t = dir.path().join("accels.toml");
    std::fs::write(&t, "[[accelerator]]\nname = \"TomlCard\"\nusd_per_hour = 0.5\nbf16_flops = 3e14\nmem_bw = 1e12\n")
        .unwrap();
    let v = json(&["cost", "--preset", "step3", "--accel-file", t.to_str().unwrap(), "--accel", "TomlCard", "--json"]);
    // No FP8: unit cost from the BF16 peak. FFN $ per token = FFN FLOPs * price / (3600 * peak).
    let want = 5.3288632320e10 * 0.5 / (3600.0 * 3e14) * 1e6;
    assert!((v["cost_per_1m_tokens"]["ffn"]["TomlCard"].as_f64().unwrap() - want).abs() < 1e-12);

    std::fs::write(&j, r#"[{"name": "Bad", "usd_per_hour": -1, "bf16_flops": 5e14, "mem_bw": 2e12}]"#).unwrap();
    let out = step3(&["cost", "--preset", "step3", "--accel-file", j.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("accelerator `Bad`: `usd_per_hour` must be a positive number"), "{}", stderr(&out));
}

#[test]
fn the_plot_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("cost.svg");
    let out = step3(&["cost", "--preset", "step3", "--plot", svg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"));
    for name in ["Step-3", "DSv3", "Qwen3 MoE 235B", "MiniMax M1", "Pangu Pro MoE"] {
        assert!(text.contains(name), "legend lacks {name}");
    }
}

#[test]
fn bad_input_is_refused() {
    let cases: [(&[&str], &str); 5] = [
        (&["cost", "--preset", "gpt5"], "unknown preset `gpt5`; known: dsv3"),
        (&["cost", "--preset", "step3", "--accel", "tpu"], "unknown accelerator `tpu`"),
        (&["cost", "--preset", "step3", "--context", "0"], "--context must be at least 1"),
        (&["cost"], "give --preset NAME or --config FILE"),
        (&["cost", "--config", "/nonexistent/config.json"], "/nonexistent/config.json"),
    ];
    for (args, needle) in cases {
        let out = step3(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}
