//! Images through the `step3` binary: preprocessing output, multimodal generation with two images
//! (the golden tokens), placeholder expansion, and every kind of bad image.

mod common;

use common::*;
use step3::{DType, Device, LoadOptions, Step3Checkpoint};

fn image(name: &str) -> String {
    fixtures().join("images").join(name).to_string_lossy().into_owned()
}

fn mm_ids() -> String {
    golden_json("vl-f32")["mm"]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn generate_with_two_images_gives_the_golden_tokens() {
    let dir = fixtures().join("vl-f32").to_string_lossy().into_owned();
    let (a, b) = (image("wide_150x62.png"), image("grid_760x620.png"));
    let images = ["--image", &a, "--image", &b, "--crop-size", "40"];
    let ids = mm_ids();
    let out = greedy_ids(&dir, &ids, &images);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "124,232,166,224,5,16,159,227\n");

    // logits with the same prompt match the golden prefill logits.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("l.safetensors");
    let mut args = vec!["logits", "--model-dir", &dir, "--ids", &ids];
    args.extend_from_slice(&images);
    args.extend_from_slice(&["--out", file.to_str().unwrap()]);
    let out = step3(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let golden = read_tensors(&fixtures().join("vl-f32/golden.safetensors"));
    let err = step3_cli::verify::relative_error(&read_tensors(&file)["logits"], &golden["mm.prefill_logits"]).unwrap();
    assert!(err < 1e-4, "{err}");
}

#[test]
fn placeholders_must_match_the_images() {
    let dir = fixtures().join("vl-f32").to_string_lossy().into_owned();
    // The golden layout for two images, but only one image given.
    let out = step3(&[
        "generate",
        "--model-dir",
        &dir,
        "--ids",
        &mm_ids(),
        "--image",
        &image("wide_150x62.png"),
        "--crop-size",
        "40",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the prompt has 95 <im_patch> tokens but the images give 43 features"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn one_placeholder_per_image_is_expanded_by_the_library() {
    let ckpt = Step3Checkpoint::open(fixtures().join("vl-f32")).unwrap();
    let model = ckpt
        .load(&LoadOptions { dtype: DType::F32, device: Device::Cpu, crop_size: Some(40), ..Default::default() })
        .unwrap();
    let g = golden_json("vl-f32");
    let s = &g["special_token_ids"];
    let id = |k: &str| s[k].as_u64().unwrap() as u32;
    let tokens = step3::ImageTokenIds {
        im_start: id("<im_start>"),
        im_end: id("<im_end>"),
        im_patch: id("<im_patch>"),
        patch_start: id("<patch_start>"),
        patch_end: id("<patch_end>"),
        patch_newline: id("<patch_newline>"),
    };
    let images: Vec<_> = ["wide_150x62.png", "grid_760x620.png"]
        .iter()
        .map(|n| model.load_image(std::path::Path::new(&image(n))).unwrap())
        .collect();
    // The golden prompt with each image's layout collapsed to one <im_patch>.
    let full: Vec<u32> = g["mm"]["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let mut short = Vec::new();
    let mut in_image = false;
    for &t in &full {
        let marker = [
            tokens.im_start,
            tokens.im_end,
            tokens.im_patch,
            tokens.patch_start,
            tokens.patch_end,
            tokens.patch_newline,
        ]
        .contains(&t);
        if marker && !in_image {
            short.push(tokens.im_patch);
            in_image = true;
        } else if !marker {
            in_image = false;
            short.push(t);
        }
    }
    assert_eq!(short.iter().filter(|&&t| t == tokens.im_patch).count(), 2);
    assert_eq!(model.expand_placeholders(&short, &images, &tokens).unwrap(), full);
    // Already expanded prompts are left alone; a wrong count is an error.
    assert_eq!(model.expand_placeholders(&full, &images, &tokens).unwrap(), full);
    let mut three = short.clone();
    three.push(tokens.im_patch);
    let err = model.expand_placeholders(&three, &images, &tokens).unwrap_err().to_string();
    assert!(err.contains("the prompt has 3 <im_patch> placeholders for 2 image(s)"), "{err}");
}

#[test]
fn preprocess_prints_the_layout_and_writes_the_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("p.safetensors");
    let dir = fixtures().join("vl-f32").to_string_lossy().into_owned();
    let out = step3(&[
        "preprocess",
        "--image",
        &image("band_800x450.png"),
        "--model-dir",
        &dir,
        "--crop-size",
        "40",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("preprocess/tiny.json")).unwrap()).unwrap();
    let g = &golden["images"]["band_800x450"];
    assert_eq!(v["num_patches"], g["num_patches"]);
    assert_eq!(v["patch_newline_mask"], g["patch_newline_mask"]);
    assert_eq!(v["token_layout_segments"], g["token_layout_segments"]);
    let t = read_tensors(&file);
    let gt = read_tensors(&fixtures().join("preprocess/tiny.safetensors"));
    for k in ["pixel_values", "patch_pixel_values"] {
        assert_eq!(step3_cli::verify::max_abs_diff(&t[k], &gt[&format!("band_800x450.{k}")]).unwrap(), 0.0, "{k}");
    }
    // Real settings without a model: Step3's 728 / 504 and 169 / 81 tokens per view.
    let out = step3(&["preprocess", "--image", &image("square_64x48.png"), "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["num_patches"], 0);
    assert_eq!(
        v["token_layout_segments"],
        serde_json::json!([["<im_start>", 1], ["<im_patch>", 169], ["<im_end>", 1]])
    );
    assert!(!read_tensors(&file).contains_key("patch_pixel_values"));
    assert_eq!(read_tensors(&file)["pixel_values"].dims(), &[1, 3, 728, 728]);
}

/// The CRC-32 PNG chunks carry (over chunk type and data).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn bad_images_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    std::fs::write(p("empty.png"), b"").unwrap();
    std::fs::write(p("text.png"), b"this is not an image").unwrap();
    let png = std::fs::read(image("grid_760x620.png")).unwrap();
    std::fs::write(p("truncated.png"), &png[..png.len() / 2]).unwrap();
    // One pixel wide is fine (padded to a square), unless the square breaks the pixel limit.
    image::RgbImage::new(1, 12_000).save(p("thin.png")).unwrap();
    // A PNG header claiming 100000 x 100000 pixels: refused before any pixel buffer is allocated.
    let mut bomb = png[..33].to_vec();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    bomb.extend_from_slice(&png[33..]);
    std::fs::write(p("bomb.png"), &bomb).unwrap();
    let cases = [
        (p("missing.png"), "missing.png"),
        (p("empty.png"), "empty (0 bytes)"),
        (p("text.png"), "cannot decode the image"),
        (p("truncated.png"), "cannot decode the image"),
        (p("thin.png"), "the 1x12000 image is padded to a 12000x12000 square"),
        (p("bomb.png"), "100000x100000 pixels, more than the limit"),
    ];
    let dir = fixtures().join("vl-f32").to_string_lossy().into_owned();
    for (file, needle) in cases {
        let out = step3(&["preprocess", "--image", &file, "--out", &p("o.safetensors")]);
        assert_eq!(out.status.code(), Some(1), "{file}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{file}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"));
        let out = step3(&["generate", "--model-dir", &dir, "--ids", "1,301", "--image", &file, "--crop-size", "40"]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        assert!(stderr(&out).contains(needle), "{file}: {}", stderr(&out));
    }
}

#[test]
fn unusable_view_sizes_name_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("o.safetensors").to_string_lossy().into_owned();
    let img = image("square_64x48.png");
    let dir = fixtures().join("vl-f32").to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 6] = [
        (&["--image-size", "0"], "--image-size 0 is not usable"),
        (&["--crop-size", "0"], "--crop-size 0 is not usable"),
        (&["--image-size", "30"], "--image-size 30 is not usable"),
        (&["--model-dir", &dir, "--crop-size", "0"], "--crop-size 0 is not usable"),
        (&["--model-dir", &dir, "--image-size", "7"], "multiple of the ViT patch size 4, at least 8 pixels"),
        (&["--patch-size", "0"], "--patch-size and --projector-stride must be positive"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["preprocess", "--image", &img, "--out", &out_file];
        args.extend_from_slice(extra);
        let out = step3(&args);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{extra:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{extra:?}");
    }
    let out = step3(&["preprocess", "--image", &img, "--out", &out_file, "--image-size", "0"]);
    assert!(
        stderr(&out).contains("positive multiple of the ViT patch size 14, at least 28 pixels"),
        "{}",
        stderr(&out)
    );
}

/// Images one pixel wide or tall run through the whole model, with the token layout the reference
/// gives them (their preprocessing is checked against the reference in `preprocess/thin.*`, see
/// tests/goldens.rs).
#[test]
fn thin_images_run_through_the_model() {
    let dir = fixtures().join("vl-f32").to_string_lossy().into_owned();
    let thin: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("preprocess/thin.json")).unwrap()).unwrap();
    let special = golden_json("vl-f32")["special_token_ids"].clone();
    for name in ["thin_1x1", "thin_1x4", "thin_4000x1"] {
        let mut ids = vec!["1".to_string()];
        for seg in thin["images"][name]["token_layout_segments"].as_array().unwrap() {
            let id = special[seg[0].as_str().unwrap()].to_string();
            ids.extend(std::iter::repeat_n(id, seg[1].as_u64().unwrap() as usize));
        }
        ids.push("7".to_string());
        let file = image(&format!("{name}.png"));
        let extra = ["--image", file.as_str(), "--crop-size", "40"];
        let out = step3(
            &[&["generate", "--model-dir", &dir, "--ids", &ids.join(","), "--max-new-tokens", "2"][..], &extra[..]]
                .concat(),
        );
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert_eq!(stdout(&out).trim().split(',').count(), 2, "{name}: {}", stdout(&out));
    }
}
