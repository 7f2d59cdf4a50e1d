"""Run a raw-pixel lowbit file from plain onnxruntime: numpy + onnxruntime, no lowbit, no torch.

A file exported with ``lowbit-export MODEL --input uint8`` (Python: ``lowbit.export(...,
input="uint8")``) takes the image bytes as they are, uint8 ``[N, 3, 32, 32]`` (``--layout
nhwc``: ``[N, 32, 32, 3]``, as most image decoders give them), and does the model's
normalisation and input quantization inside. Any onnxruntime app feeds it the same way: C++,
Java, C#, mobile, or onnxruntime-web (not run here: no browser on this machine)::

    import * as ort from "onnxruntime-web";
    const session = await ort.InferenceSession.create("student.onnx");
    // rgba: Uint8ClampedArray from canvas.getContext("2d").getImageData(0, 0, 32, 32).data
    const hwc = new Uint8Array(32 * 32 * 3);
    for (let i = 0; i < 32 * 32; i++) hwc.set(rgba.subarray(4 * i, 4 * i + 3), 3 * i);
    const input = new ort.Tensor("uint8", hwc, [1, 32, 32, 3]);   // an --layout nhwc file
    const { logits } = await session.run({ input });
    const cls = logits.data.indexOf(Math.max(...logits.data));

Usage: ``python examples/raw_pixels.py MODEL.onnx CIFAR10_DIR [--limit N] [--nhwc]
[--predictions OUT.npy]`` (CIFAR10_DIR holds the official ``cifar-10-batches-py``
``test_batch`` pickle); prints the top-1 accuracy on the CIFAR-10 test set.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import onnxruntime as ort


def cifar10_test(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[10000, 3, 32, 32]`` and labels of the official CIFAR-10 test pickle."""
    path = next(p for p in (folder / "test_batch", folder / "cifar-10-batches-py" / "test_batch")
                if p.is_file())
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], np.int64)


def predict(session: ort.InferenceSession, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class indices for uint8 images in the file's layout, ``batch`` images per call."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(images), batch)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("cifar10_dir", type=Path)
    p.add_argument("--limit", type=int, default=None, help="first N test images only")
    p.add_argument("--nhwc", action="store_true", help="the file takes [N, H, W, C] pixels")
    p.add_argument("--predictions", default=None, help="also save the classes as .npy")
    args = p.parse_args()
    images, labels = cifar10_test(args.cifar10_dir)
    images, labels = images[:args.limit], labels[:args.limit]
    if args.nhwc:
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    classes = predict(session, images)
    if args.predictions:
        np.save(args.predictions, classes)
    print(f"top-1 accuracy {np.mean(classes == labels):.2%} on {len(labels)} CIFAR-10 test "
          f"images (raw uint8 pixels, plain onnxruntime {ort.__version__})")


if __name__ == "__main__":
    main()
