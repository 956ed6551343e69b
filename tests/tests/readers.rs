//! The dataset readers on small files written here in the real formats (CIFAR-10, CIFAR-100,
//! IDX, image folders), read through ast-train's public API.

use ast_tests::{pattern_images, write_cifar10, write_idx};
use ast_train::data::{read_cifar10, read_cifar100, read_mnist_dir, Cifar100Labels, ImageFolder};

#[test]
fn cifar10_records_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar10(dir.path(), 4);
    let (train, test) = read_cifar10(dir.path()).unwrap();
    assert_eq!((train.len(), test.len()), (20, 4));
    assert_eq!(
        (train.channels, train.height, train.width, train.classes),
        (3, 32, 32, 10)
    );
    let (pixels, _) = pattern_images(4, 3, 32, 32, 10);
    assert_eq!(test.image(2), &pixels[2 * 3072..3 * 3072]);
}

#[test]
fn cifar100_coarse_and_fine_labels() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    for (coarse, fine) in [(3u8, 42u8), (19, 99)] {
        bytes.extend_from_slice(&[coarse, fine]);
        bytes.extend(std::iter::repeat_n(7u8, 3072));
    }
    std::fs::write(dir.path().join("train.bin"), &bytes).unwrap();
    std::fs::write(dir.path().join("test.bin"), &bytes[..3074]).unwrap();
    let (train, test) = read_cifar100(dir.path(), Cifar100Labels::Fine).unwrap();
    assert_eq!(train.labels, vec![42, 99]);
    assert_eq!((train.classes, test.len()), (100, 1));
    let (train, _) = read_cifar100(dir.path(), Cifar100Labels::Coarse).unwrap();
    assert_eq!((train.labels.clone(), train.classes), (vec![3, 19], 20));
}

#[test]
fn idx_plain_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 12, 28);
    write_idx(dir.path(), "t10k", 5, 28);
    let (train, test) = read_mnist_dir(dir.path()).unwrap();
    assert_eq!(
        (train.len(), test.len(), train.height, train.channels),
        (12, 5, 28, 1)
    );
    let (pixels, labels) = pattern_images(12, 1, 28, 28, 10);
    assert_eq!(train.images, pixels);
    assert_eq!(
        train.labels,
        labels.iter().map(|&l| l as u16).collect::<Vec<_>>()
    );
}

#[test]
fn image_folder_lists_classes_and_decodes() {
    let dir = tempfile::tempdir().unwrap();
    for (class, color) in [("cat", [200u8, 10, 10]), ("dog", [10, 200, 10])] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        image::RgbImage::from_pixel(5, 4, image::Rgb(color))
            .save(dir.path().join(class).join("a.png"))
            .unwrap();
    }
    let folder = ImageFolder::open(dir.path()).unwrap();
    assert_eq!(folder.classes(), &["cat".to_string(), "dog".to_string()]);
    let (w, h, rgb, label) = folder.load_rgb(1).unwrap();
    assert_eq!((w, h, label), (5, 4, 1));
    assert_eq!(&rgb[..3], &[10, 200, 10]);
}
