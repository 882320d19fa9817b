"""Train the Fashion-MNIST feature network used for FID/IS/precision/recall (deterministic, CPU minutes).

    python scripts/train_classifier.py [--epochs 4] [--out switch_dit/evaluate/weights/fmnist_classifier.safetensors]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from switch_dit.data import FashionMNIST
from switch_dit.evaluate.classifier import WEIGHTS, FashionClassifier


def accuracy(model, images, labels, batch=1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(images), batch):
            correct += (model(images[s: s + batch]).argmax(1) == labels[s: s + batch]).sum().item()
    return correct / len(images)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--data-path", default=None)
    ap.add_argument("--out", default=str(WEIGHTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    kw = {} if args.data_path is None else {"root": args.data_path}
    train, test = FashionMNIST(split="train", image_size=32, **kw), FashionMNIST(split="test", image_size=32, **kw)
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        for s in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            idx = perm[s: s + args.batch_size]
            x, y = train.images[idx], train.labels[idx]
            flip = torch.rand(len(x), generator=g) < 0.5  # garments are left-right symmetric classes
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, test.images, test.labels):.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    from safetensors.torch import save_file
    save_file({k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}, args.out)
    final = accuracy(FashionClassifierLoaded(args.out), test.images, test.labels)
    print(f"saved {args.out}; test accuracy with the saved (float16) weights: {final:.4f}")


def FashionClassifierLoaded(path):
    from switch_dit.evaluate.classifier import load_classifier
    return load_classifier(path)


if __name__ == "__main__":
    main()
