"""A small CNN on CIFAR-10 in plain PyTorch, written as a Trainyard script job.

The same file runs on a laptop and under Trainyard:

    python train.py --epochs 1 --limit 512          # metrics printed to stdout
    trainyard submit --code . --entry train.py -- --epochs 3

Data, the first found wins: the dataset directory Trainyard hands over (a job with
"dataset": {"name": "cifar10"}), --data-dir (the official python batches: the
cifar-10-batches-py folder or its parent), else a small synthetic stand-in, so the
example runs anywhere, offline.
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.nn import functional as F

try:
    from worker import sdk  # on the path of every script job, and wherever Trainyard is installed
except ImportError:
    import sdk  # elsewhere: a copy of Trainyard's worker/sdk.py (standard library only) next to this

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A small CNN on CIFAR-10")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv block")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=0, help="use N training samples (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="steps between step_loss points")
    parser.add_argument("--data-dir", type=Path, help="where the CIFAR-10 python batches are")
    # A job's params (a JSON object, e.g. {"lr": 0.0005}) become defaults; arguments win.
    unknown = set(sdk.params) - set(vars(parser.parse_args([])))
    if unknown:
        parser.error(f"unknown params: {', '.join(sorted(unknown))}")
    parser.set_defaults(**sdk.params)
    return parser.parse_args()


# ---------------------------------------------------------------- data


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # Unpickling can run code: load only the official files (or your admin's copy).
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # pickled by Python 2: the keys are bytes
    # Each row is the red, green then blue 32x32 plane: already channels-first.
    return batch[b"data"].reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar(folder: Path) -> tuple[np.ndarray, ...]:
    train = [read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read_batch(folder / "test_batch")
    train_x, train_y = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    return train_x, train_y, test_x, test_y


def synthetic_cifar(n_train: int, n_test: int) -> tuple[np.ndarray, ...]:
    """CIFAR-shaped images, each class a fixed coarse colour pattern under heavy noise:
    learnable, so accuracy rises over the epochs. Seed 0 always: a resumed attempt
    must see the very same data."""
    rng = np.random.default_rng(0)
    patterns = rng.uniform(0, 255, (10, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = 0.2 * patterns[y] + rng.normal(102, 70, (n, 3, 32, 32))
        return np.clip(x, 0, 255).astype(np.uint8), y

    return *make(n_train), *make(n_test)


def load_data(args: argparse.Namespace) -> tuple[str, tuple[np.ndarray, ...]]:
    folder = sdk.dataset_dir or args.data_dir
    if folder is not None and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    # A quick run (--limit) tests on a quarter as many samples as it trains on.
    n_test = max(args.limit // 4, 10) if args.limit else None
    if folder is None:
        return "synthetic", synthetic_cifar(args.limit or 5000, n_test or 1000)
    x, y, test_x, test_y = load_cifar(folder)
    if args.limit:
        x, y, test_x, test_y = x[: args.limit], y[: args.limit], test_x[:n_test], test_y[:n_test]
    return "cifar10", (x, y, test_x, test_y)


# ---------------------------------------------------------------- model


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # No conv bias: the batch norm right after it adds its own.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def small_cnn(width: int, dropout: float, num_classes: int = 10) -> nn.Sequential:
    # Three blocks, each halving the image (32 -> 4 pixels) and doubling the channels.
    w = width
    return nn.Sequential(
        conv_block(3, w), conv_block(w, 2 * w), conv_block(2 * w, 4 * w),
        nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(4 * w * 4 * 4, 256), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(256, num_classes),
    )  # fmt: skip


# ---------------------------------------------------------------- training


def predict(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm, batch_size: int):
    """(mean loss, predicted classes) over a whole split, in eval mode: no dropout, and
    batch norm uses its running statistics."""
    model.eval()
    loss, preds = torch.zeros((), device=x.device), []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(norm(x[i : i + batch_size]))
            loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum")
            preds.append(logits.argmax(dim=1))
    return loss.item() / len(x), torch.cat(preds).cpu().numpy()


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """The shape Trainyard's evaluation jobs report, so the job page draws the per-class
    table and the confusion matrix. scikit-learn: the reference numbers (zero_division=0:
    a class never predicted scores 0)."""
    labels = list(range(len(CLASSES)))
    p, r, f1, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = [
        {"class": c, "precision": float(p[c]), "recall": float(r[c]), "f1": float(f1[c]),
         "support": int(n[c])}
        for c in labels
    ]  # fmt: skip
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "precision": float(p.mean()),
        "recall": float(r.mean()),
        "f1": float(f1.mean()),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": per_class,
        "class_names": CLASSES,
    }


def resume(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """The last epoch an earlier attempt finished (0: none). A later attempt (its worker
    was lost) continues after it with the RNG where it was, so the run matches one that
    never stopped."""
    if sdk.resume_from is None or not (sdk.resume_from / "last.pt").is_file():
        return 0
    state = torch.load(sdk.resume_from / "last.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"])
    print(f"resuming after epoch {state['epoch']}", flush=True)
    return state["epoch"]


def save(
    model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, device: torch.device
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "rng_cpu": torch.get_rng_state(),  # the shuffle, the flips, dropout on the CPU
    }
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()  # dropout and flips on the GPU
    # Atomic (a temporary file, then a rename): a crash mid-write keeps the previous one.
    sdk.save_checkpoint(lambda path: torch.save(state, path), name="last.pt")


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(sdk.device)
    dataset, (x, y, test_x, test_y) = load_data(args)
    # A fixed split from its own generator: every epoch and every resumed attempt
    # validates on the same samples.
    order = np.random.default_rng(args.seed).permutation(len(x))
    n_val = max(int(len(x) * args.val_fraction), 1)
    val_idx, train_idx = order[:n_val], order[n_val:]
    # uint8 on the device (a quarter of float32's memory), normalized batch by batch
    # with the training split's per-channel statistics.
    on_device = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    train_x, train_y = on_device(x[train_idx]), on_device(y[train_idx])
    val_x, val_y = on_device(x[val_idx]), on_device(y[val_idx])
    mean = torch.tensor(x[train_idx].mean(axis=(0, 2, 3)), dtype=torch.float32, device=device)
    std = torch.tensor(x[train_idx].std(axis=(0, 2, 3)), dtype=torch.float32, device=device)
    norm = lambda b: (b.float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # noqa: E731

    model = small_cnn(args.width, args.dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(train_x) // args.batch_size)
    steps_total = args.epochs * steps_per_epoch
    for epoch in range(resume(model, optimizer, device) + 1, args.epochs + 1):
        model.train()
        started, order = time.perf_counter(), torch.randperm(len(train_x)).to(device)
        total = torch.zeros((), device=device)  # summed on the device: no sync per step
        for i in range(steps_per_epoch):
            if sdk.should_stop():
                # The last whole epoch's checkpoint is the one to resume from: half an
                # epoch would not resume exactly. Exit 0: a clean stop.
                print(f"stop requested in epoch {epoch}: resume after epoch {epoch - 1}")
                return
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            batch = norm(train_x[idx])
            flip = torch.rand(len(idx), device=device) < 0.5  # augmentation: mirror half
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(3), batch)
            loss = F.cross_entropy(model(batch), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
            step = (epoch - 1) * steps_per_epoch + i + 1
            if (step - 1) % args.log_every == 0:  # from step 1 on: the chart starts at once
                rate = (i + 1) * args.batch_size / (time.perf_counter() - started)
                sdk.log("step_loss", loss.item(), step=step, epoch=epoch)
                sdk.progress(epoch=epoch, epochs=args.epochs, step=step, steps_total=steps_total,
                             samples_per_s=round(rate, 1))  # fmt: skip

        rate = len(train_x) / (time.perf_counter() - started)
        val_loss, val_pred = predict(model, val_x, val_y, norm, args.batch_size)
        epoch_metrics = {
            "train_loss": total.item() / len(train_x),
            "val_loss": val_loss,
            "val_accuracy": float((val_pred == y[val_idx]).mean()),
        }
        print(f"epoch {epoch}/{args.epochs}:", *(f"{k}={v:.4f}" for k, v in epoch_metrics.items()),
              f"({rate:.0f} samples/s)", flush=True)  # fmt: skip
        for key, value in epoch_metrics.items():
            sdk.log(key, value, step=epoch, epoch=epoch)
        sdk.progress(epoch=epoch, epochs=args.epochs, step=epoch * steps_per_epoch,
                     steps_total=steps_total, samples_per_s=round(rate, 1))  # fmt: skip
        save(model, optimizer, epoch, device)
        if sdk.should_stop():  # cancel, time limit, worker shutdown: saved, so stop now
            print(f"stop requested: checkpoint of epoch {epoch} saved", flush=True)
            return

    test_x, test_y_device = on_device(test_x), on_device(test_y)
    test_loss, test_pred = predict(model, test_x, test_y_device, norm, args.batch_size)
    result = scores(test_y, test_pred)
    result.update(loss=test_loss, split="test", dataset=dataset, num_samples=len(test_y))
    print(f"test: accuracy={result['accuracy']:.4f} f1={result['f1']:.4f}", flush=True)
    sdk.finish(result)


if __name__ == "__main__":
    main()
