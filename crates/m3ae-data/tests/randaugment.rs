//! Every RandAugment operation against Pillow's output on the same image
//! (`tests/fixtures/randaugment.json`, written by `scripts/randaugment_reference.py`).

use m3ae_data::image::AugmentOp;
use m3ae_data::RgbImage;
use serde_json::Value;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn every_operation_matches_pillow() -> anyhow::Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/randaugment.json"
    );
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let size = |k: &str| fx[k].as_u64().unwrap() as usize;
    let img = RgbImage {
        width: size("width"),
        height: size("height"),
        data: hex(fx["image"].as_str().unwrap()),
    };
    let f = &fx["fill"];
    let fill = [0, 1, 2].map(|i| f[i].as_u64().unwrap() as u8);
    let mut failures = Vec::new();
    let ops = fx["ops"].as_array().unwrap();
    assert_eq!(ops.len(), 22);
    for case in ops {
        let name = case["op"].as_str().unwrap();
        let arg = case["args"].get(0).and_then(Value::as_f64).unwrap_or(0.0);
        let op = match name {
            "auto_contrast" => AugmentOp::AutoContrast,
            "equalize" => AugmentOp::Equalize,
            "invert" => AugmentOp::Invert,
            "rotate" => AugmentOp::Rotate(arg),
            "posterize" => AugmentOp::Posterize(arg as u32),
            "solarize" => AugmentOp::Solarize(arg as u32),
            "solarize_add" => AugmentOp::SolarizeAdd(arg as u32),
            "color" => AugmentOp::Color(arg),
            "contrast" => AugmentOp::Contrast(arg),
            "brightness" => AugmentOp::Brightness(arg),
            "sharpness" => AugmentOp::Sharpness(arg),
            "shear_x" => AugmentOp::ShearX(arg),
            "shear_y" => AugmentOp::ShearY(arg),
            "translate_x" => AugmentOp::TranslateX(arg),
            "translate_y" => AugmentOp::TranslateY(arg),
            other => anyhow::bail!("fixture names an unknown operation {other:?}"),
        };
        let want = hex(case["out"].as_str().unwrap());
        let got = op.apply(&img, fill).data;
        let diff: Vec<usize> = (0..want.len()).filter(|&i| want[i] != got[i]).collect();
        let max = diff
            .iter()
            .map(|&i| (want[i] as i32 - got[i] as i32).abs())
            .max()
            .unwrap_or(0);
        if !diff.is_empty() {
            failures.push(format!(
                "{op:?}: {} of {} values differ (max {max}; first at {}: Pillow {} ours {})",
                diff.len(),
                want.len(),
                diff[0],
                want[diff[0]],
                got[diff[0]]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
