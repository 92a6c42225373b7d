//! Fixtures shared by `benches/data_pipeline.rs` and `examples/data_stages.rs`: samples of
//! photo-like 256x256 JPEGs with scene captions, to hold in memory (`m3ae::data::InMemory`, so
//! the bench measures processing, not disk).

use m3ae::data::{CaptionedScenes, ImageData, Sample, ScenesConfig};
use std::sync::Arc;

pub fn samples(n: usize) -> Vec<Sample> {
    // photo-like 256x256 JPEGs (quality 90): smooth gradients plus texture
    let scenes = CaptionedScenes::new(ScenesConfig::default()).unwrap();
    (0..n)
        .map(|i| {
            let sc = scenes.scene(i);
            let img = image::RgbImage::from_fn(256, 256, |x, y| {
                let p = &sc.pixels[(((y / 4) * 64 + x / 4) * 3) as usize..][..3];
                let t = ((x * 13 + y * 7 + i as u32) % 17) as u8;
                image::Rgb([p[0].saturating_add(t), p[1], p[2].saturating_sub(t)])
            });
            let mut jpg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
                .encode_image(&img)
                .unwrap();
            Sample {
                key: i.to_string(),
                image: Some(ImageData::Encoded(Arc::new(jpg))),
                text: Some(sc.caption),
                label: None,
                file: "memory".into(),
                ..Default::default()
            }
        })
        .collect()
}
