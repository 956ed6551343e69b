//! torchvision-style augmentations producing normalised `f32` CHW samples.
//!
//! All randomness comes from a [`MaskRng`] passed in, so a sample's augmentation is fixed by
//! the generator's seed and stream.

use ast_core::rng::MaskRng;

/// Per-channel CIFAR mean, in `[0, 1]` units.
pub const CIFAR_MEAN: [f32; 3] = [125.3 / 255.0, 123.0 / 255.0, 113.9 / 255.0];
/// Per-channel CIFAR standard deviation, in `[0, 1]` units.
pub const CIFAR_STD: [f32; 3] = [63.0 / 255.0, 62.1 / 255.0, 66.7 / 255.0];
/// Per-channel ImageNet mean.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel ImageNet standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Fashion-MNIST mean (single channel).
pub const FASHION_MNIST_MEAN: f32 = 0.2860;
/// Fashion-MNIST standard deviation (single channel).
pub const FASHION_MNIST_STD: f32 = 0.3530;

/// Per-channel normalisation `(raw / 255 - mean[c]) / std[c]`.
///
/// Channel `c` uses entry `c % len`, so one-entry vectors apply to every channel; empty
/// vectors mean 0 and 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    /// Means, in `[0, 1]` units.
    pub mean: Vec<f32>,
    /// Standard deviations, in `[0, 1]` units.
    pub std: Vec<f32>,
}

impl Normalize {
    /// CIFAR-10/100 statistics.
    pub fn cifar() -> Self {
        Normalize {
            mean: CIFAR_MEAN.to_vec(),
            std: CIFAR_STD.to_vec(),
        }
    }

    /// ImageNet statistics.
    pub fn imagenet() -> Self {
        Normalize {
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
        }
    }

    /// Fashion-MNIST statistics repeated over `channels` channels.
    pub fn fashion_mnist(channels: usize) -> Self {
        Normalize {
            mean: vec![FASHION_MNIST_MEAN; channels],
            std: vec![FASHION_MNIST_STD; channels],
        }
    }

    /// Only scales to `[0, 1]` (mean 0, std 1).
    pub fn unit() -> Self {
        Normalize {
            mean: vec![0.0],
            std: vec![1.0],
        }
    }

    /// The normalised value of a raw pixel value `raw` (0–255 scale) in channel `channel`.
    pub fn apply(&self, channel: usize, raw: f32) -> f32 {
        let pick =
            |v: &[f32], default: f32| v.get(channel % v.len().max(1)).copied().unwrap_or(default);
        (raw / 255.0 - pick(&self.mean, 0.0)) / pick(&self.std, 1.0)
    }
}

/// CIFAR-style augmentation of an in-memory image to `out_channels × pad_to × pad_to`.
///
/// The image is first placed centred on a `pad_to × pad_to` canvas of zeros (28×28
/// Fashion-MNIST gets 2 pixels each side; larger images are centre-cropped), single-channel
/// images are repeated to `out_channels` (and RGB turned to luma when `out_channels == 1`).
/// Training then takes a random `pad_to` crop of the canvas zero-padded by `crop_padding`
/// (zeros are raw pixel value 0, before normalisation, as torchvision's
/// `RandomCrop(padding=4)` on a PIL image) and flips horizontally with probability 0.5.
#[derive(Debug, Clone, PartialEq)]
pub struct CifarTransform {
    /// Whether [`CifarTransform::apply`] augments.
    pub train: bool,
    /// Output height and width.
    pub pad_to: usize,
    /// Zero padding of the random crop.
    pub crop_padding: usize,
    /// Whether training flips horizontally with probability 0.5.
    pub flip: bool,
    /// Output channels.
    pub out_channels: usize,
    /// Normalisation applied last.
    pub normalize: Normalize,
}

impl CifarTransform {
    /// The standard CIFAR pipeline: 32×32, crop padding 4, flip, 3 channels, CIFAR statistics.
    pub fn cifar(train: bool) -> Self {
        CifarTransform {
            train,
            pad_to: 32,
            crop_padding: 4,
            flip: true,
            out_channels: 3,
            normalize: Normalize::cifar(),
        }
    }

    /// Fashion-MNIST padded to 32×32 with `out_channels` channels and its statistics.
    pub fn fashion_mnist(train: bool, out_channels: usize) -> Self {
        CifarTransform {
            out_channels,
            normalize: Normalize::fashion_mnist(out_channels),
            ..Self::cifar(train)
        }
    }

    /// Output shape `[C, H, W]`.
    pub fn out_shape(&self) -> [usize; 3] {
        [self.out_channels, self.pad_to, self.pad_to]
    }

    /// Transforms a CHW image of shape `[c, h, w]` into `out`, augmenting iff `self.train`.
    ///
    /// # Panics
    /// If `image.len() != c·h·w` or `out.len() != out_channels·pad_to·pad_to`.
    pub fn apply(&self, image: &[u8], shape: [usize; 3], rng: &mut MaskRng, out: &mut [f32]) {
        self.apply_with(self.train, image, shape, rng, out);
    }

    /// As [`CifarTransform::apply`], augmenting iff `augment`.
    ///
    /// # Panics
    /// If `image.len() != c·h·w` or `out.len() != out_channels·pad_to·pad_to`.
    pub fn apply_with(
        &self,
        augment: bool,
        image: &[u8],
        shape: [usize; 3],
        rng: &mut MaskRng,
        out: &mut [f32],
    ) {
        let [c, h, w] = shape;
        let s = self.pad_to;
        assert_eq!(image.len(), c * h * w, "image does not match its shape");
        assert_eq!(out.len(), self.out_channels * s * s, "output buffer size");
        let p = self.crop_padding as isize;
        let (dy, dx, flip) = if augment {
            let range = 2 * self.crop_padding as u64 + 1;
            let dy = (rng.next_u64() % range) as isize;
            let dx = (rng.next_u64() % range) as isize;
            (dy, dx, self.flip && rng.next_f64() < 0.5)
        } else {
            (p, p, false)
        };
        // Source row/column = output row/column + shift.
        let shift_y = dy - p - (s as isize - h as isize) / 2;
        let shift_x = dx - p - (s as isize - w as isize) / 2;
        let luma = c == 3 && self.out_channels == 1;
        for k in 0..self.out_channels {
            for y in 0..s {
                let sy = y as isize + shift_y;
                for x in 0..s {
                    let xc = if flip { s - 1 - x } else { x };
                    let sx = xc as isize + shift_x;
                    let raw = if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize || c == 0
                    {
                        0.0
                    } else {
                        let at = |ch: usize| image[(ch * h + sy as usize) * w + sx as usize] as f32;
                        if luma {
                            0.299 * at(0) + 0.587 * at(1) + 0.114 * at(2)
                        } else {
                            at(k % c)
                        }
                    };
                    out[(k * s + y) * s + x] = self.normalize.apply(k, raw);
                }
            }
        }
    }
}

/// ImageNet-style augmentation of an RGB image to `3 × size × size`.
///
/// Training: torchvision's `RandomResizedCrop(size, scale, ratio)` (10 attempts, then a
/// centre-crop fallback) and a horizontal flip with probability 0.5. Evaluation:
/// `Resize(resize)` of the shorter side then `CenterCrop(size)`. Resampling is bilinear with
/// PIL-style antialiasing (the triangle filter widened by the downscale factor).
#[derive(Debug, Clone, PartialEq)]
pub struct ImagenetTransform {
    /// Whether [`ImagenetTransform::apply`] augments.
    pub train: bool,
    /// Output height and width (224).
    pub size: usize,
    /// Evaluation: the shorter side is resized to this before the centre crop (256).
    pub resize: usize,
    /// Range of the crop's area as a fraction of the image's (0.08, 1).
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio w/h (3/4, 4/3).
    pub ratio: (f64, f64),
    /// Whether training flips horizontally with probability 0.5.
    pub flip: bool,
    /// Normalisation applied last.
    pub normalize: Normalize,
}

/// A crop of the source image, in source pixel units: left, top, width, height.
type Region = (f64, f64, f64, f64);

/// Python's `round` (ties to even) as an integer.
fn round_even(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

impl ImagenetTransform {
    /// The standard pipeline: 224, resize 256, scale (0.08, 1), ratio (3/4, 4/3), flip,
    /// ImageNet statistics.
    pub fn new(train: bool) -> Self {
        ImagenetTransform {
            train,
            size: 224,
            resize: 256,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip: true,
            normalize: Normalize::imagenet(),
        }
    }

    /// Output shape `[C, H, W]`.
    pub fn out_shape(&self) -> [usize; 3] {
        [3, self.size, self.size]
    }

    /// torchvision's `RandomResizedCrop.get_params` on a `w × h` image.
    fn random_crop(&self, w: usize, h: usize, rng: &mut MaskRng) -> Region {
        let area = (w * h) as f64;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * (self.scale.0 + (self.scale.1 - self.scale.0) * rng.next_f64());
            let aspect = (lr0 + (lr1 - lr0) * rng.next_f64()).exp();
            let cw = round_even((target * aspect).sqrt());
            let ch = round_even((target / aspect).sqrt());
            if cw > 0 && cw <= w && ch > 0 && ch <= h {
                let top = rng.next_u64() % (h - ch + 1) as u64;
                let left = rng.next_u64() % (w - cw + 1) as u64;
                return (left as f64, top as f64, cw as f64, ch as f64);
            }
        }
        let in_ratio = w as f64 / h as f64;
        let (lo, hi) = (
            self.ratio.0.min(self.ratio.1),
            self.ratio.0.max(self.ratio.1),
        );
        let (cw, ch) = if in_ratio < lo {
            (w, round_even(w as f64 / lo).min(h))
        } else if in_ratio > hi {
            (round_even(h as f64 * hi).min(w), h)
        } else {
            (w, h)
        };
        (
            ((w - cw) / 2) as f64,
            ((h - ch) / 2) as f64,
            cw as f64,
            ch as f64,
        )
    }

    /// `Resize(resize)` then `CenterCrop(size)`, as a region of the source image.
    fn center_crop(&self, w: usize, h: usize) -> Region {
        let r = self.resize as f64;
        let (rw, rh) = if w <= h {
            (r, (r * h as f64 / w as f64).floor())
        } else {
            ((r * w as f64 / h as f64).floor(), r)
        };
        let size = self.size as f64;
        let top = ((rh - size) / 2.0).round_ties_even();
        let left = ((rw - size) / 2.0).round_ties_even();
        let (fx, fy) = (w as f64 / rw, h as f64 / rh);
        (left * fx, top * fy, size * fx, size * fy)
    }

    /// Transforms an HWC RGB image of `width × height` into `out`, augmenting iff `self.train`.
    ///
    /// # Panics
    /// If `rgb.len() != width·height·3` or `out.len() != 3·size·size`.
    pub fn apply(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
        rng: &mut MaskRng,
        out: &mut [f32],
    ) {
        self.apply_with(self.train, rgb, width, height, rng, out);
    }

    /// As [`ImagenetTransform::apply`], augmenting iff `augment`.
    ///
    /// # Panics
    /// If `rgb.len() != width·height·3` or `out.len() != 3·size·size`.
    pub fn apply_with(
        &self,
        augment: bool,
        rgb: &[u8],
        width: usize,
        height: usize,
        rng: &mut MaskRng,
        out: &mut [f32],
    ) {
        let s = self.size;
        assert_eq!(
            rgb.len(),
            width * height * 3,
            "image does not match its size"
        );
        assert_eq!(out.len(), 3 * s * s, "output buffer size");
        if width == 0 || height == 0 {
            for (i, o) in out.iter_mut().enumerate() {
                *o = self.normalize.apply(i / (s * s), 0.0);
            }
            return;
        }
        let (region, flip) = if augment {
            let region = self.random_crop(width, height, rng);
            (region, self.flip && rng.next_f64() < 0.5)
        } else {
            (self.center_crop(width, height), false)
        };
        let (x0, y0, cw, ch) = region;
        let wx = filter_weights(width, x0, cw, s);
        let wy = filter_weights(height, y0, ch, s);
        // Horizontal pass over the rows the vertical pass needs.
        let row_lo = wy.iter().map(|t| t.0).min().unwrap_or(0);
        let row_hi = wy.iter().map(|t| t.0 + t.1.len()).max().unwrap_or(0);
        let mut tmp = vec![0f32; (row_hi - row_lo) * s * 3];
        for (r, row) in (row_lo..row_hi).zip(tmp.chunks_exact_mut(s * 3)) {
            let src = &rgb[r * width * 3..(r + 1) * width * 3];
            for (ox, (start, ws)) in wx.iter().enumerate() {
                for (j, wgt) in ws.iter().enumerate() {
                    for c in 0..3 {
                        row[ox * 3 + c] += wgt * src[(start + j) * 3 + c] as f32;
                    }
                }
            }
        }
        for (oy, (start, ws)) in wy.iter().enumerate() {
            for ox in 0..s {
                let dst_x = if flip { s - 1 - ox } else { ox };
                for c in 0..3 {
                    let v: f32 = ws
                        .iter()
                        .enumerate()
                        .map(|(j, wgt)| wgt * tmp[((start + j - row_lo) * s + ox) * 3 + c])
                        .sum();
                    out[(c * s + oy) * s + dst_x] = self.normalize.apply(c, v);
                }
            }
        }
    }
}

/// Resampling weights from the source span `[x0, x0 + span)` of an axis of `in_size` pixels
/// onto `out_size` pixels: for each output pixel, the first source pixel and the normalised
/// weights of the triangle filter, widened by the downscale factor as PIL does.
fn filter_weights(in_size: usize, x0: f64, span: f64, out_size: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = span / out_size as f64;
    let support = scale.max(1.0);
    (0..out_size)
        .map(|o| {
            let center = x0 + (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0) as usize).min(in_size - 1);
            let hi = ((center + support + 0.5).floor().max(0.0) as usize).clamp(lo + 1, in_size);
            let mut ws: Vec<f64> = (lo..hi)
                .map(|i| (1.0 - ((i as f64 + 0.5 - center) / support).abs()).max(0.0))
                .collect();
            let total: f64 = ws.iter().sum();
            if total > 0.0 {
                ws.iter_mut().for_each(|w| *w /= total);
            } else {
                // Centre outside the image (only for crops larger than it): nearest pixel.
                ws.iter_mut().for_each(|w| *w = 0.0);
                let nearest = (center.floor().max(0.0) as usize).clamp(lo, hi - 1);
                ws[nearest - lo] = 1.0;
            }
            (lo, ws.into_iter().map(|w| w as f32).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_transform(train: bool, pad_to: usize, crop_padding: usize) -> CifarTransform {
        CifarTransform {
            train,
            pad_to,
            crop_padding,
            flip: true,
            out_channels: 1,
            normalize: Normalize::unit(),
        }
    }

    /// Raw pixel values back from unit-normalised output.
    fn raw(out: &[f32]) -> Vec<f32> {
        out.iter().map(|v| (v * 255.0).round()).collect()
    }

    #[test]
    fn normalisation_values() {
        let n = Normalize::cifar();
        assert!(n.apply(0, 125.3).abs() < 1e-5);
        assert!((n.apply(0, 0.0) - (-125.3 / 63.0)).abs() < 1e-5);
        assert!((n.apply(2, 255.0) - (255.0 - 113.9) / 66.7).abs() < 1e-5);
        let f = Normalize::fashion_mnist(3);
        assert_eq!(f.mean, vec![0.2860; 3]);
        assert!((f.apply(1, 255.0) - (1.0 - 0.2860) / 0.3530).abs() < 1e-5);
        // A one-entry normaliser applies to every channel.
        let one = Normalize {
            mean: vec![0.5],
            std: vec![0.25],
        };
        assert!((one.apply(2, 255.0) - 2.0).abs() < 1e-6);
        let i = Normalize::imagenet();
        assert!((i.apply(1, 0.456 * 255.0)).abs() < 1e-5);
    }

    #[test]
    fn eval_pads_centred() {
        // 1-channel 2×2 image [1 2; 3 4] on a 6×6 canvas: offset 2.
        let t = unit_transform(false, 6, 4);
        let mut out = vec![0.0; 36];
        t.apply(&[1, 2, 3, 4], [1, 2, 2], &mut MaskRng::new(0, 0), &mut out);
        #[rustfmt::skip]
        let expected = [
            0., 0., 0., 0., 0., 0.,
            0., 0., 0., 0., 0., 0.,
            0., 0., 1., 2., 0., 0.,
            0., 0., 3., 4., 0., 0.,
            0., 0., 0., 0., 0., 0.,
            0., 0., 0., 0., 0., 0.,
        ];
        assert_eq!(raw(&out), expected);
    }

    #[test]
    fn train_crop_and_flip_match_hand_computation() {
        // Canvas 4×4 with the image at rows/cols 1..3; crop padding 1 makes a 6×6 padded
        // image; offsets (dy, dx) = (0, 2) then a flip give:
        #[rustfmt::skip]
        let expected = [
            0., 0., 0., 0.,
            0., 0., 0., 0.,
            0., 0., 2., 1.,
            0., 0., 4., 3.,
        ];
        let t = unit_transform(true, 4, 1);
        let mut found = false;
        for seed in 0..1000 {
            let mut probe = MaskRng::new(seed, 0);
            let (dy, dx) = (probe.next_u64() % 3, probe.next_u64() % 3);
            let flip = probe.next_f64() < 0.5;
            if (dy, dx, flip) != (0, 2, true) {
                continue;
            }
            let mut out = vec![0.0; 16];
            t.apply(
                &[1, 2, 3, 4],
                [1, 2, 2],
                &mut MaskRng::new(seed, 0),
                &mut out,
            );
            assert_eq!(raw(&out), expected);
            found = true;
            break;
        }
        assert!(found);
    }

    #[test]
    fn train_crop_matches_explicit_padding_for_many_draws() {
        let (h, w, s, p) = (3usize, 2usize, 5usize, 2usize);
        let img: Vec<u8> = (1..=6).collect();
        let t = unit_transform(true, s, p);
        // Explicit canvas (image at offset ((5-3)/2, (5-2)/2) = (1, 1)), then padding.
        let big = s + 2 * p;
        let mut padded = vec![0f32; big * big];
        for y in 0..h {
            for x in 0..w {
                padded[(y + 1 + p) * big + x + 1 + p] = img[y * w + x] as f32;
            }
        }
        let mut flips = 0;
        for seed in 0..50 {
            let mut probe = MaskRng::new(seed, 9);
            let dy = (probe.next_u64() % 5) as usize;
            let dx = (probe.next_u64() % 5) as usize;
            let flip = probe.next_f64() < 0.5;
            flips += flip as usize;
            let mut out = vec![0.0; s * s];
            t.apply(&img, [1, h, w], &mut MaskRng::new(seed, 9), &mut out);
            for y in 0..s {
                for x in 0..s {
                    let xs = if flip { s - 1 - x } else { x };
                    assert_eq!(raw(&out)[y * s + x], padded[(y + dy) * big + xs + dx]);
                }
            }
        }
        assert!(flips > 10 && flips < 40, "flips {flips}");
    }

    #[test]
    fn grey_28_is_padded_to_32_and_repeated() {
        let img: Vec<u8> = (0..28 * 28).map(|i| (i % 255) as u8 + 1).collect();
        let t = CifarTransform::fashion_mnist(false, 3);
        assert_eq!(t.out_shape(), [3, 32, 32]);
        let mut out = vec![0.0; 3 * 32 * 32];
        t.apply(&img, [1, 28, 28], &mut MaskRng::new(1, 1), &mut out);
        let zero = (0.0 - 0.2860) / 0.3530;
        for k in 0..3 {
            let plane = &out[k * 1024..(k + 1) * 1024];
            assert!((plane[0] - zero).abs() < 1e-6);
            assert!((plane[31 * 32 + 31] - zero).abs() < 1e-6);
            // Pixel (0, 0) of the image lands at (2, 2); (27, 27) at (29, 29).
            assert!((plane[2 * 32 + 2] - (1.0 / 255.0 - 0.2860) / 0.3530).abs() < 1e-5);
            let last = img[27 * 28 + 27] as f32;
            assert!((plane[29 * 32 + 29] - (last / 255.0 - 0.2860) / 0.3530).abs() < 1e-5);
            assert!((plane[30 * 32 + 30] - zero).abs() < 1e-6);
        }
    }

    #[test]
    fn rgb_to_one_channel_uses_luma() {
        let t = CifarTransform {
            out_channels: 1,
            normalize: Normalize::unit(),
            ..CifarTransform::cifar(false)
        };
        let mut img = vec![0u8; 3 * 32 * 32];
        img[0] = 100;
        img[1024] = 200;
        img[2048] = 50;
        let mut out = vec![0.0; 1024];
        t.apply(&img, [3, 32, 32], &mut MaskRng::new(0, 0), &mut out);
        let expected = 0.299 * 100.0 + 0.587 * 200.0 + 0.114 * 50.0;
        assert!((out[0] * 255.0 - expected).abs() < 1e-3);
    }

    fn unit_imagenet(train: bool, size: usize, resize: usize) -> ImagenetTransform {
        ImagenetTransform {
            size,
            resize,
            normalize: Normalize::unit(),
            ..ImagenetTransform::new(train)
        }
    }

    /// An HWC image whose pixel (x, y) is (10x + y, 2x, 3y).
    fn gradient(w: usize, h: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for y in 0..h {
            for x in 0..w {
                v.extend([(10 * x + y) as u8, (2 * x) as u8, (3 * y) as u8]);
            }
        }
        v
    }

    /// Output value of channel `c` at (x, y) back in 0–255 units.
    fn at(out: &[f32], s: usize, c: usize, x: usize, y: usize) -> f32 {
        out[(c * s + y) * s + x] * 255.0
    }

    #[test]
    fn imagenet_eval_center_crop_without_scaling() {
        // 6×4 image, resize 4: the shorter side is already 4, so the resized image is 6×4;
        // the centre 2×2 crop starts at top 1, left 2.
        let t = unit_imagenet(false, 2, 4);
        let img = gradient(6, 4);
        let mut out = vec![0.0; 12];
        t.apply(&img, 6, 4, &mut MaskRng::new(0, 0), &mut out);
        for y in 0..2 {
            for x in 0..2 {
                let (sx, sy) = (x + 2, y + 1);
                assert!((at(&out, 2, 0, x, y) - (10 * sx + sy) as f32).abs() < 1e-3);
                assert!((at(&out, 2, 1, x, y) - (2 * sx) as f32).abs() < 1e-3);
                assert!((at(&out, 2, 2, x, y) - (3 * sy) as f32).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn imagenet_downscale_is_antialiased_triangle() {
        // A 4×4 image halved: each output averages source pixels with weights
        // 0.75, 0.75, 0.25 (normalised by 1.75) per axis.
        let t = unit_imagenet(false, 2, 2);
        let img = gradient(4, 4);
        let mut out = vec![0.0; 12];
        t.apply(&img, 4, 4, &mut MaskRng::new(0, 0), &mut out);
        // Green = 2x: column values 0, 2, 4, 6.
        assert!(
            (at(&out, 2, 1, 0, 0) - (0.0 * 0.75 + 2.0 * 0.75 + 4.0 * 0.25) / 1.75).abs() < 1e-4
        );
        assert!(
            (at(&out, 2, 1, 1, 0) - (2.0 * 0.25 + 4.0 * 0.75 + 6.0 * 0.75) / 1.75).abs() < 1e-4
        );
        // Blue = 3y: row values 0, 3, 6, 9.
        assert!(
            (at(&out, 2, 2, 0, 1) - (3.0 * 0.25 + 6.0 * 0.75 + 9.0 * 0.75) / 1.75).abs() < 1e-4
        );
    }

    #[test]
    fn imagenet_train_full_crop_and_flip() {
        // Scale and ratio fixed at 1 on a square image: the crop is the whole image.
        let t = ImagenetTransform {
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            ..unit_imagenet(true, 4, 4)
        };
        let img = gradient(4, 4);
        let mut seen = [false; 2];
        for seed in 0..20 {
            let mut out = vec![0.0; 48];
            t.apply(&img, 4, 4, &mut MaskRng::new(seed, 0), &mut out);
            let flipped = (at(&out, 4, 0, 0, 0) - 30.0).abs() < 1e-3;
            seen[flipped as usize] = true;
            for y in 0..4 {
                for x in 0..4 {
                    let sx = if flipped { 3 - x } else { x };
                    assert!((at(&out, 4, 0, x, y) - (10 * sx + y) as f32).abs() < 1e-3);
                }
            }
        }
        assert_eq!(seen, [true, true]);
    }

    #[test]
    fn imagenet_train_fallback_is_centre_crop() {
        // 6×4 image, scale 1, ratio 1: every attempt wants 5×5 (round(√24)), too tall, so
        // the fallback crops the centred 4×4 square starting at column 1.
        let t = ImagenetTransform {
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            flip: false,
            ..unit_imagenet(true, 4, 4)
        };
        let img = gradient(6, 4);
        let mut out = vec![0.0; 48];
        t.apply(&img, 6, 4, &mut MaskRng::new(3, 0), &mut out);
        for y in 0..4 {
            for x in 0..4 {
                assert!((at(&out, 4, 0, x, y) - (10 * (x + 1) + y) as f32).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn imagenet_random_crops_stay_in_range_and_are_seeded() {
        let t = unit_imagenet(true, 8, 10);
        let img = gradient(13, 9);
        let run = |seed| {
            let mut out = vec![0.0; 3 * 64];
            t.apply(&img, 13, 9, &mut MaskRng::new(seed, 1), &mut out);
            out
        };
        for seed in 0..30 {
            let a = run(seed);
            assert_eq!(a, run(seed));
            assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
        }
        assert_ne!(run(1), run(2));
    }
}
