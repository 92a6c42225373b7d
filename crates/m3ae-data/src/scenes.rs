//! **Captioned scenes**: a built-in image-text data set, no files, deterministic from
//! (seed, split, index).
//!
//! Each image (default 64x64 RGB) holds 1-3 objects on a plain or lightly textured dark
//! background. An object has a shape (8 kinds), a colour (10), a size (small / large) and a
//! position (9 cells of a 3x3 grid, with jitter). The caption describes every object in English
//! with some variation in wording ("there is a large blue ring at the bottom and a small red
//! triangle on the left"). The **main object** is the one the probe label describes: it is
//! mentioned first, and when there are several objects it is the only large one, so the label
//! can be read from the pixels alone as well as from the caption.
//!
//! Splits: [`SceneSplit::Train`] and [`SceneSplit::Test`] never use the held-out shapes and
//! colours (default: star and hexagon; white and brown); [`SceneSplit::Ood`] gives the main
//! object a held-out shape and/or colour ([`OodKind`]), for out-of-distribution tests.

use crate::sample::{ImageData, Partition, Record, RecordIter, Sample, Source};
use crate::seed::{self, purpose};
use crate::{Error, Result};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Shape names (label order).
pub const SHAPES: [&str; 8] = [
    "circle", "square", "triangle", "diamond", "ring", "cross", "star", "hexagon",
];
/// Colour names (label order) and their RGB.
pub const COLOURS: [(&str, [u8; 3]); 10] = [
    ("red", [220, 40, 40]),
    ("orange", [245, 140, 20]),
    ("yellow", [240, 225, 40]),
    ("green", [50, 185, 60]),
    ("cyan", [40, 205, 225]),
    ("blue", [45, 85, 235]),
    ("purple", [145, 60, 205]),
    ("pink", [245, 135, 195]),
    ("white", [245, 245, 245]),
    ("brown", [135, 80, 40]),
];
const POSITIONS: [&[&str]; 9] = [
    &["in the top left corner", "at the top left"],
    &["at the top", "at the top centre"],
    &["in the top right corner", "at the top right"],
    &["on the left", "at the left"],
    &["in the centre", "in the middle"],
    &["on the right", "at the right"],
    &["in the bottom left corner", "at the bottom left"],
    &["at the bottom", "at the bottom centre"],
    &["in the bottom right corner", "at the bottom right"],
];
/// The words captions use for each shape of [`SHAPES`] (same order; the first is the shape's
/// name): what a masked shape word may be predicted as and still be right.
///
/// ```
/// use m3ae_data::scenes::{SHAPES, SHAPE_WORDS};
/// assert!(SHAPES.iter().zip(SHAPE_WORDS).all(|(s, w)| w[0] == *s));
/// ```
pub const SHAPE_WORDS: [&[&str]; 8] = [
    &["circle", "disc"],
    &["square"],
    &["triangle"],
    &["diamond", "rhombus"],
    &["ring", "hoop"],
    &["cross", "plus sign"],
    &["star"],
    &["hexagon"],
];
const SMALL: [&str; 3] = ["small", "little", "tiny"];
const LARGE: [&str; 3] = ["large", "big", "huge"];
const PREFIX: [&str; 6] = [
    "",
    "there is ",
    "a picture of ",
    "this image shows ",
    "we see ",
    "an image with ",
];

/// Which split of the scenes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SceneSplit {
    /// Training scenes (no held-out shape or colour).
    #[default]
    Train,
    /// Test scenes, same distribution as train, different random draws.
    Test,
    /// The main object has a held-out shape and/or colour.
    Ood,
}

/// What the out-of-distribution split holds out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OodKind {
    /// The main object has a held-out shape.
    #[default]
    Shapes,
    /// The main object has a held-out colour.
    Colours,
    /// Both.
    Both,
}

/// The probe label of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LabelKind {
    /// Shape of the main object (0..8).
    #[default]
    Shape,
    /// Colour of the main object (0..10).
    Colour,
    /// Both: `shape * 10 + colour`.
    Both,
}

/// Configuration of the captioned scenes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScenesConfig {
    /// Base seed.
    pub seed: u64,
    /// Number of scenes in the split.
    pub len: usize,
    /// Image side in pixels.
    pub image_size: usize,
    /// The split.
    pub split: SceneSplit,
    /// What the label is.
    pub label: LabelKind,
    /// Shapes (indices into [`SHAPES`]) never used by train and test.
    pub held_out_shapes: Vec<usize>,
    /// Colours (indices into [`COLOURS`]) never used by train and test.
    pub held_out_colours: Vec<usize>,
    /// What the OOD split holds out.
    pub ood: OodKind,
}

impl Default for ScenesConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            len: 10_000,
            image_size: 64,
            split: SceneSplit::Train,
            label: LabelKind::Shape,
            held_out_shapes: vec![6, 7],
            held_out_colours: vec![8, 9],
            ood: OodKind::Shapes,
        }
    }
}

/// One object of a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// True when large.
    pub large: bool,
    /// Grid cell 0..9 (row-major 3x3).
    pub cell: usize,
    /// Centre in pixels.
    pub center: (f32, f32),
    /// Radius in pixels.
    pub radius: f32,
}

impl Object {
    /// The patches (row-major, `grid` x `grid` patches of `patch` pixels) whose square touches
    /// the object's bounding box grown by a pixel: every patch that shows any of it.
    ///
    /// ```
    /// let o = m3ae_data::CaptionedScenes::new(Default::default())?.scene(0).objects[0];
    /// let p = o.patches(8, 8);
    /// let (cx, cy) = (o.center.0 as usize / 8, o.center.1 as usize / 8);
    /// assert!(p.contains(&(cy * 8 + cx)) && p.len() < 64);
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn patches(&self, grid: usize, patch: usize) -> Vec<usize> {
        let r = self.radius + 1.0;
        let (x0, x1) = (self.center.0 - r, self.center.0 + r);
        let (y0, y1) = (self.center.1 - r, self.center.1 + r);
        let p = patch as f32;
        (0..grid * grid)
            .filter(|&i| {
                let (px, py) = ((i % grid) as f32 * p, (i / grid) as f32 * p);
                px < x1 && px + p > x0 && py < y1 && py + p > y0
            })
            .collect()
    }

    /// The object described with the first wording of each part, as the captions name it
    /// ("small red circle at the top left"; no article, no prefix): for captions written by
    /// hand around a scene, e.g. naming one object whose patches are all masked.
    ///
    /// ```
    /// let scenes = m3ae_data::CaptionedScenes::new(Default::default())?;
    /// let o = scenes.scene(0).objects[0];
    /// let p = o.phrase();
    /// assert!(p.contains(m3ae_data::scenes::COLOURS[o.colour].0));
    /// assert!(p.contains(m3ae_data::scenes::SHAPES[o.shape]));
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn phrase(&self) -> String {
        let size = if self.large { LARGE[0] } else { SMALL[0] };
        format!(
            "{size} {} {} {}",
            COLOURS[self.colour].0, SHAPE_WORDS[self.shape][0], POSITIONS[self.cell][1]
        )
    }
}

/// A generated scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// The objects, main object first.
    pub objects: Vec<Object>,
    /// The caption.
    pub caption: String,
    /// The probe label.
    pub label: i64,
    /// `[size, size, 3]` RGB pixels.
    pub pixels: Vec<u8>,
}

/// One scene in three renderings ([`CaptionedScenes::scene_layers`]), each `[size, size, 3]`
/// RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneLayers {
    /// The scene as the data set gives it.
    pub pixels: Vec<u8>,
    /// The same scene without the background's noise texture.
    pub clean: Vec<u8>,
    /// The background alone (its colour, no texture, no objects).
    pub background: Vec<u8>,
}

/// The captioned-scenes data set.
#[derive(Debug, Clone)]
pub struct CaptionedScenes {
    cfg: ScenesConfig,
    shapes_in: Vec<usize>,
    colours_in: Vec<usize>,
}

impl CaptionedScenes {
    /// Validates the configuration.
    pub fn new(cfg: ScenesConfig) -> Result<Self> {
        if cfg.image_size < 16 {
            return Err(Error::Config {
                field: "image_size",
                msg: format!("{} is below 16 pixels", cfg.image_size),
            });
        }
        let shapes_in: Vec<usize> = (0..SHAPES.len())
            .filter(|s| !cfg.held_out_shapes.contains(s))
            .collect();
        let colours_in: Vec<usize> = (0..COLOURS.len())
            .filter(|c| !cfg.held_out_colours.contains(c))
            .collect();
        if shapes_in.is_empty() || colours_in.is_empty() {
            return Err(Error::Config {
                field: "held_out",
                msg: "every shape or every colour is held out".into(),
            });
        }
        let ood_needs_shapes = matches!(cfg.ood, OodKind::Shapes | OodKind::Both);
        let ood_needs_colours = matches!(cfg.ood, OodKind::Colours | OodKind::Both);
        if cfg.split == SceneSplit::Ood
            && ((ood_needs_shapes && cfg.held_out_shapes.is_empty())
                || (ood_needs_colours && cfg.held_out_colours.is_empty())
                || cfg.held_out_shapes.iter().any(|&s| s >= SHAPES.len())
                || cfg.held_out_colours.iter().any(|&c| c >= COLOURS.len()))
        {
            return Err(Error::Config {
                field: "ood",
                msg: "the OOD split needs valid held-out shapes / colours".into(),
            });
        }
        Ok(Self {
            cfg,
            shapes_in,
            colours_in,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ScenesConfig {
        &self.cfg
    }

    /// Number of label classes for the configured [`LabelKind`].
    pub fn num_classes(&self) -> usize {
        match self.cfg.label {
            LabelKind::Shape => SHAPES.len(),
            LabelKind::Colour => COLOURS.len(),
            LabelKind::Both => SHAPES.len() * COLOURS.len(),
        }
    }

    /// Captions of the first `n` train scenes (to train a tokenizer on).
    pub fn corpus(&self, n: usize) -> Vec<String> {
        let train = Self {
            cfg: ScenesConfig {
                split: SceneSplit::Train,
                ..self.cfg.clone()
            },
            ..self.clone()
        };
        (0..n).map(|i| train.caption_only(i)).collect()
    }

    /// A WordPiece tokenizer ([`crate::Tokenizer::train_wordpiece`]) of at most `vocab_size`
    /// tokens trained on the captions of the first `captions` train scenes ([`Self::corpus`]).
    ///
    /// ```
    /// let scenes = m3ae_data::CaptionedScenes::new(Default::default())?;
    /// let tok = scenes.train_tokenizer(100, 200)?;
    /// assert!(tok.vocab_size() <= 200);
    /// let caption = scenes.corpus(1).remove(0);
    /// let ids = tok.encode(&caption, 32)?.ids;
    /// assert_eq!(tok.decode(&ids)?, caption.to_lowercase());
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn train_tokenizer(&self, captions: usize, vocab_size: usize) -> Result<crate::Tokenizer> {
        let corpus = self.corpus(captions);
        crate::Tokenizer::train_wordpiece(corpus.iter().map(String::as_str), vocab_size)
    }

    fn rng(&self, index: usize) -> ChaCha8Rng {
        let split = match self.cfg.split {
            SceneSplit::Train => 0,
            SceneSplit::Test => 1,
            SceneSplit::Ood => 2,
        };
        seed::rng(self.cfg.seed, purpose::SCENES, split, index as u64)
    }

    fn layout(&self, rng: &mut ChaCha8Rng) -> Vec<Object> {
        let s = self.cfg.image_size as f32;
        let n = rng.random_range(1..=3usize);
        let mut cells: Vec<usize> = (0..9).collect();
        cells.shuffle(rng);
        (0..n)
            .map(|k| {
                let main = k == 0;
                let shape = if main
                    && self.cfg.split == SceneSplit::Ood
                    && matches!(self.cfg.ood, OodKind::Shapes | OodKind::Both)
                {
                    *self.cfg.held_out_shapes.choose(rng).unwrap_or(&0)
                } else {
                    *self.shapes_in.choose(rng).unwrap_or(&0)
                };
                let colour = if main
                    && self.cfg.split == SceneSplit::Ood
                    && matches!(self.cfg.ood, OodKind::Colours | OodKind::Both)
                {
                    *self.cfg.held_out_colours.choose(rng).unwrap_or(&0)
                } else {
                    *self.colours_in.choose(rng).unwrap_or(&0)
                };
                let large = if n == 1 { rng.random::<bool>() } else { main };
                let cell = cells[k];
                let jitter = |rng: &mut ChaCha8Rng| (rng.random::<f32>() - 0.5) * JITTER * s;
                let (cx, cy) = cell_centre(cell, s);
                let cx = cx + jitter(rng);
                let cy = cy + jitter(rng);
                let radius = mean_radius(large, s) * (SIZE_MIN + SIZE_SPREAD * rng.random::<f32>());
                Object {
                    shape,
                    colour,
                    large,
                    cell,
                    center: (cx, cy),
                    radius,
                }
            })
            .collect()
    }

    fn describe_objects(objects: &[Object], rng: &mut ChaCha8Rng) -> String {
        let phrase = |o: &Object, rng: &mut ChaCha8Rng| {
            let size = if o.large {
                LARGE.choose(rng)
            } else {
                SMALL.choose(rng)
            }
            .copied()
            .unwrap_or("small");
            let shape = SHAPE_WORDS[o.shape].choose(rng).copied().unwrap_or("shape");
            let colour = COLOURS[o.colour].0;
            let pos = POSITIONS[o.cell].choose(rng).copied().unwrap_or("");
            // word order variation: "small red ring" or "red ring, small" is not English;
            // vary between size-colour and colour-only-with-size-later forms instead.
            let body = if rng.random::<f32>() < 0.8 {
                format!("{size} {colour} {shape}")
            } else {
                format!("{colour} {shape} that is {size}")
            };
            let article = if body.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            format!("{article} {body} {pos}")
        };
        let parts: Vec<String> = objects.iter().map(|o| phrase(o, rng)).collect();
        let mut s = PREFIX.choose(rng).copied().unwrap_or("").to_string();
        match parts.len() {
            1 => s.push_str(&parts[0]),
            2 => {
                let join = [" and ", ", and ", " as well as ", " next to "]
                    .choose(rng)
                    .copied()
                    .unwrap_or(" and ");
                // "next to" would claim adjacency; use it only for neighbouring cells
                let adjacent = {
                    let (a, b) = (objects[0].cell, objects[1].cell);
                    let (ax, ay, bx, by) = (a % 3, a / 3, b % 3, b / 3);
                    ax.abs_diff(bx) + ay.abs_diff(by) == 1
                };
                let join = if join == " next to " && !adjacent {
                    " and "
                } else {
                    join
                };
                s.push_str(&parts[0]);
                s.push_str(join);
                s.push_str(&parts[1]);
            }
            _ => {
                s.push_str(&parts[0]);
                s.push_str(", ");
                s.push_str(&parts[1..parts.len() - 1].join(", "));
                s.push_str(if rng.random::<bool>() {
                    " and "
                } else {
                    ", and "
                });
                s.push_str(&parts[parts.len() - 1]);
            }
        }
        if rng.random::<bool>() {
            s.push('.');
        }
        s
    }

    fn label_of(&self, main: &Object) -> i64 {
        match self.cfg.label {
            LabelKind::Shape => main.shape as i64,
            LabelKind::Colour => main.colour as i64,
            LabelKind::Both => (main.shape * COLOURS.len() + main.colour) as i64,
        }
    }

    fn caption_only(&self, index: usize) -> String {
        let mut rng = self.rng(index);
        let objects = self.layout(&mut rng);
        Self::describe_objects(&objects, &mut rng)
    }

    /// Scene `index` of the split: objects, caption, label and pixels.
    ///
    /// ```
    /// use m3ae_data::{CaptionedScenes, ScenesConfig};
    /// let ds = CaptionedScenes::new(ScenesConfig::default())?;
    /// let a = ds.scene(5);
    /// assert_eq!(a, ds.scene(5)); // deterministic
    /// assert_eq!(a.pixels.len(), 64 * 64 * 3);
    /// assert!(a.caption.contains(m3ae_data::scenes::COLOURS[a.objects[0].colour].0));
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn scene(&self, index: usize) -> Scene {
        let mut rng = self.rng(index);
        let objects = self.layout(&mut rng);
        let caption = Self::describe_objects(&objects, &mut rng);
        let pixels = self.render(&objects, &mut rng);
        Scene {
            label: self.label_of(&objects[0]),
            objects,
            caption,
            pixels,
        }
    }

    /// Scene `index` drawn three ways from the same random draws: as [`CaptionedScenes::scene`]
    /// renders it, without the background's per-pixel noise texture, and without its objects
    /// (the plain background colour): the references against which a reconstruction's error is
    /// split into the irreducible noise and the objects.
    ///
    /// ```
    /// use m3ae_data::{CaptionedScenes, ScenesConfig};
    /// let ds = CaptionedScenes::new(ScenesConfig::default())?;
    /// let l = ds.scene_layers(5);
    /// assert_eq!(l.pixels, ds.scene(5).pixels);
    /// assert_eq!((l.clean.len(), l.background.len()), (64 * 64 * 3, 64 * 64 * 3));
    /// // the background has one colour
    /// assert!(l.background.chunks(3).all(|p| p == &l.background[..3]));
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn scene_layers(&self, index: usize) -> SceneLayers {
        SceneLayers {
            pixels: self.redraw(index, None, true),
            clean: self.redraw(index, None, false),
            background: self.redraw(index, Some(&[]), false),
        }
    }

    /// Scene `index` drawn again from its own random draws, with `objects` instead of its own
    /// when given, and with or without the background's `noise` texture.
    fn redraw(&self, index: usize, objects: Option<&[Object]>, noise: bool) -> Vec<u8> {
        let mut rng = self.rng(index);
        let own = self.layout(&mut rng);
        let _caption = Self::describe_objects(&own, &mut rng);
        self.render_with(objects.unwrap_or(&own), &mut rng, noise)
    }

    /// Scene `index`'s plain background (no texture) with `objects` drawn on it instead of the
    /// scene's own: for reference images such as what a caption alone determines (an object
    /// at its cell's centre with its size's mean radius). `[size, size, 3]` RGB.
    ///
    /// ```
    /// use m3ae_data::{CaptionedScenes, ScenesConfig};
    /// let ds = CaptionedScenes::new(ScenesConfig::default())?;
    /// let objects = ds.scene(5).objects;
    /// assert_eq!(ds.render_on_background(5, &objects), ds.scene_layers(5).clean);
    /// assert_eq!(ds.render_on_background(5, &[]), ds.scene_layers(5).background);
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn render_on_background(&self, index: usize, objects: &[Object]) -> Vec<u8> {
        self.redraw(index, Some(objects), false)
    }

    /// Where a caption puts an object: the centre of its grid cell, and the mean radius of its
    /// size (the scene's jitter and size variation are not in the words).
    ///
    /// ```
    /// use m3ae_data::{CaptionedScenes, ScenesConfig};
    /// let ds = CaptionedScenes::new(ScenesConfig::default())?;
    /// let o = ds.scene(0).objects[0];
    /// let named = ds.as_named(&o);
    /// assert_eq!((named.shape, named.colour, named.cell), (o.shape, o.colour, o.cell));
    /// assert!((named.center.0 - o.center.0).abs() <= 0.04 * 64.0 + 1e-3);
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn as_named(&self, o: &Object) -> Object {
        let s = self.cfg.image_size as f32;
        Object {
            center: cell_centre(o.cell, s),
            radius: mean_radius(o.large, s),
            ..*o
        }
    }

    /// What a caption naming `o` may stand for: `o` with its centre on an `n x n` grid over the
    /// jitter about its cell's centre and its radius at `n` points over its size's variation
    /// (the midpoints of equal bins of each uniform draw), `n^3` objects. The mean of their
    /// renders approximates the drawing of least squared error that the words alone allow.
    ///
    /// ```
    /// use m3ae_data::{CaptionedScenes, ScenesConfig};
    /// let ds = CaptionedScenes::new(ScenesConfig::default())?;
    /// let o = ds.scene(0).objects[0];
    /// let v = ds.named_variants(&o, 3);
    /// assert_eq!(v.len(), 27);
    /// // the middle one is the object as named
    /// assert_eq!(v[13], ds.as_named(&o));
    /// # Ok::<(), m3ae_data::Error>(())
    /// ```
    pub fn named_variants(&self, o: &Object, n: usize) -> Vec<Object> {
        let named = self.as_named(o);
        let s = self.cfg.image_size as f32;
        // the midpoint of bin k of n over [0, 1)
        let at = |k: usize| (k as f32 + 0.5) / n as f32;
        let mut out = Vec::with_capacity(n * n * n);
        for iy in 0..n {
            for ix in 0..n {
                for ir in 0..n {
                    out.push(Object {
                        center: (
                            named.center.0 + (at(ix) - 0.5) * JITTER * s,
                            named.center.1 + (at(iy) - 0.5) * JITTER * s,
                        ),
                        radius: named.radius * (SIZE_MIN + SIZE_SPREAD * at(ir)),
                        ..named
                    });
                }
            }
        }
        out
    }

    fn render(&self, objects: &[Object], rng: &mut ChaCha8Rng) -> Vec<u8> {
        self.render_with(objects, rng, true)
    }

    /// Renders `objects`; `noise`: add the texture of a textured background (its draws are made
    /// either way, so the rest of the scene does not change).
    fn render_with(&self, objects: &[Object], rng: &mut ChaCha8Rng, noise: bool) -> Vec<u8> {
        let s = self.cfg.image_size;
        let base = rng.random_range(20..=70) as f32;
        let tint = [
            rng.random_range(-6.0..6.0f32),
            rng.random_range(-6.0..6.0f32),
            rng.random_range(-6.0..6.0f32),
        ];
        let textured = rng.random::<bool>();
        let mut img = vec![0f32; s * s * 3];
        for px in img.chunks_exact_mut(3) {
            let n = if textured {
                rng.random_range(-7.0..7.0f32)
            } else {
                0.0
            };
            let n = if noise { n } else { 0.0 };
            for c in 0..3 {
                px[c] = base + tint[c] + n;
            }
        }
        // draw small objects first so the main (large) one is on top
        for o in objects.iter().rev() {
            let col = COLOURS[o.colour].1;
            let r = o.radius;
            let (x0, x1) = (
                (o.center.0 - r - 2.0).max(0.0) as usize,
                ((o.center.0 + r + 2.0) as usize).min(s),
            );
            let (y0, y1) = (
                (o.center.1 - r - 2.0).max(0.0) as usize,
                ((o.center.1 + r + 2.0) as usize).min(s),
            );
            for y in y0..y1 {
                for x in x0..x1 {
                    let p = (x as f32 + 0.5 - o.center.0, y as f32 + 0.5 - o.center.1);
                    let cov = (0.5 - sdf(o.shape, p, r)).clamp(0.0, 1.0);
                    if cov > 0.0 {
                        let px = &mut img[(y * s + x) * 3..(y * s + x) * 3 + 3];
                        for c in 0..3 {
                            px[c] = px[c] * (1.0 - cov) + col[c] as f32 * cov;
                        }
                    }
                }
            }
        }
        img.iter()
            .map(|v| v.round().clamp(0.0, 255.0) as u8)
            .collect()
    }
}

/// The centre of grid cell `cell` (row-major 3 x 3) of an image of side `s` pixels.
fn cell_centre(cell: usize, s: f32) -> (f32, f32) {
    (
        ((cell % 3) as f32 + 0.5) * s / 3.0,
        ((cell / 3) as f32 + 0.5) * s / 3.0,
    )
}

/// Width of the uniform jitter of an object's centre about its cell's centre, in each axis, as a
/// fraction of the image side.
const JITTER: f32 = 0.08;
/// An object's radius is its size's mean radius times a uniform draw from
/// `[SIZE_MIN, SIZE_MIN + SIZE_SPREAD)`.
const SIZE_MIN: f32 = 0.92;
/// See [`SIZE_MIN`].
const SIZE_SPREAD: f32 = 0.16;

/// The mean radius of a large or small object in an image of side `s` pixels.
fn mean_radius(large: bool, s: f32) -> f32 {
    s * if large { 0.15 } else { 0.085 }
}

/// Signed distance (pixels, negative inside) of point `p` to shape `shape` of radius `r`.
fn sdf(shape: usize, p: (f32, f32), r: f32) -> f32 {
    let (x, y) = p;
    let boxd = |hw: f32, hh: f32| (x.abs() - hw).max(y.abs() - hh);
    match shape {
        0 => (x * x + y * y).sqrt() - r,
        1 => boxd(0.82 * r, 0.82 * r),
        2 => polygon(p, &regular(3, r, r)),
        3 => (x.abs() + y.abs() - r) / std::f32::consts::SQRT_2,
        4 => ((x * x + y * y).sqrt() - 0.72 * r).abs() - 0.28 * r,
        5 => boxd(r, 0.3 * r).min(boxd(0.3 * r, r)),
        6 => polygon(p, &regular(10, r, 0.45 * r)),
        _ => polygon(p, &regular(6, r, r)),
    }
}

/// Vertices of a regular polygon (or a star when `r_in != r_out`) pointing up.
fn regular(n: usize, r_out: f32, r_in: f32) -> Vec<(f32, f32)> {
    let k = n;
    (0..k)
        .map(|i| {
            let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::TAU / k as f32;
            let r = if r_in != r_out && i % 2 == 1 {
                r_in
            } else {
                r_out
            };
            (r * a.cos(), r * a.sin())
        })
        .collect()
}

fn polygon(p: (f32, f32), v: &[(f32, f32)]) -> f32 {
    let mut d = f32::MAX;
    let mut inside = false;
    for i in 0..v.len() {
        let (a, b) = (v[i], v[(i + 1) % v.len()]);
        let (ex, ey) = (b.0 - a.0, b.1 - a.1);
        let (wx, wy) = (p.0 - a.0, p.1 - a.1);
        let t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0);
        let (dx, dy) = (wx - ex * t, wy - ey * t);
        d = d.min((dx * dx + dy * dy).sqrt());
        if (a.1 > p.1) != (b.1 > p.1) && p.0 < (b.0 - a.0) * (p.1 - a.1) / (b.1 - a.1) + a.0 {
            inside = !inside;
        }
    }
    if inside {
        -d
    } else {
        d
    }
}

impl Source for CaptionedScenes {
    fn open(&self, partition: &Partition) -> Result<RecordIter> {
        partition.check()?;
        let (p, n) = partition.index_and_count();
        let me = self.clone();
        let file: Arc<str> = format!("captioned-scenes/{:?}", self.cfg.split)
            .to_lowercase()
            .into();
        Ok(Box::new((p..self.cfg.len).step_by(n).map(move |i| {
            let sc = me.scene(i);
            Ok(Record::Sample(Sample {
                key: format!("{file}/{i}"),
                image: Some(ImageData::Pixels {
                    width: me.cfg.image_size,
                    height: me.cfg.image_size,
                    channels: 3,
                    data: sc.pixels,
                }),
                text: Some(sc.caption),
                label: Some(sc.label),
                file: file.clone(),
                ..Default::default()
            }))
        })))
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.cfg.len)
    }

    fn describe(&self) -> String {
        format!(
            "captioned scenes ({:?}, {} scenes, {}px)",
            self.cfg.split, self.cfg.len, self.cfg.image_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_respect_held_out_sets_and_captions_carry_the_facts() {
        let train = CaptionedScenes::new(ScenesConfig::default()).unwrap();
        let ood = CaptionedScenes::new(ScenesConfig {
            split: SceneSplit::Ood,
            ..Default::default()
        })
        .unwrap();
        let mut shapes = std::collections::BTreeSet::new();
        let mut colours = std::collections::BTreeSet::new();
        let mut counts = [0usize; 4];
        for i in 0..300 {
            let sc = train.scene(i);
            counts[sc.objects.len()] += 1;
            for o in &sc.objects {
                assert!(o.shape < 6 && o.colour < 8, "{o:?}");
                shapes.insert(o.shape);
                colours.insert(o.colour);
                assert!(sc.caption.contains(COLOURS[o.colour].0));
                assert!(SHAPE_WORDS[o.shape].iter().any(|w| sc.caption.contains(w)));
            }
            if sc.objects.len() > 1 {
                assert!(sc.objects[0].large && sc.objects[1..].iter().all(|o| !o.large));
            }
            // the main object's colour is in the pixels at its centre
            let m = sc.objects[0];
            let (x, y) = (m.center.0 as usize, m.center.1 as usize);
            if m.shape != 4 {
                let px = &sc.pixels[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3];
                let want = COLOURS[m.colour].1;
                assert!(
                    px.iter().zip(want).all(|(&a, b)| a.abs_diff(b) < 3),
                    "{px:?} vs {want:?}"
                );
            }
        }
        assert_eq!(shapes.len(), 6);
        assert_eq!(colours.len(), 8);
        assert!(counts[1] > 50 && counts[2] > 50 && counts[3] > 50);
        for i in 0..50 {
            assert!(ood.scene(i).objects[0].shape >= 6);
        }
        let distinct: std::collections::BTreeSet<String> =
            (0..200).map(|i| train.scene(i).caption).collect();
        assert!(distinct.len() > 190);
    }
}
