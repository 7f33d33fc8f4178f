"""Train the embedded default model: a small CLIP (HF CLIPModel) on Fashion-MNIST with captions built from
class names and prompt templates.

Reproduce the committed weights with:
    .venv/bin/python scripts/train_embedded.py --out src/patchsae/models/embedded --epochs 7 --seed 0

Each step contrasts a batch of images with one freshly templated caption per class; images of the same class
share that caption, so the image->text loss is a softmax over the 10 captions and the text->image loss spreads
its target uniformly over the batch's images of the caption's class.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from patchsae.data.fashion_mnist import CLASS_NAMES, load_arrays  # noqa: E402
from patchsae.models.templates import EMBEDDED_TEMPLATES  # noqa: E402
from patchsae.models.tokenizer import build_byte_tokenizer  # noqa: E402

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (scaled to [0, 1])


def make_model():
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=258, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=256, eos_token_id=257,
                pad_token_id=257, hidden_act="quick_gelu")
    vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                  image_size=28, patch_size=4, num_channels=3, hidden_act="quick_gelu")
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)
    return CLIPModel(cfg)


def to_pixels(x_uint8_NHW: torch.Tensor) -> torch.Tensor:
    x = (x_uint8_NHW.float() / 255.0 - MEAN) / STD
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def augment(x_NHW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (zero padding)."""
    n = x_NHW.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x_NHW = torch.where(flip[:, None, None], x_NHW.flip(-1), x_NHW)
    padded = F.pad(x_NHW, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, dy: dy + 28, dx: dx + 28]


def text_embeds(model, tok, prompts):
    enc = tok(prompts, padding=True, return_tensors="pt")
    out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return F.normalize(out.pooler_output, dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model, tok, x_NHW, y_N, batch=1000):
    model.eval()
    prompts = [t.format(c) for c in CLASS_NAMES for t in EMBEDDED_TEMPLATES]
    emb = text_embeds(model, tok, prompts).view(len(CLASS_NAMES), len(EMBEDDED_TEMPLATES), -1)
    head = F.normalize(emb.mean(1), dim=-1)
    correct = 0
    for i in range(0, len(y_N), batch):
        img = F.normalize(model.get_image_features(pixel_values=to_pixels(x_NHW[i: i + batch])).pooler_output, dim=-1)
        correct += (img @ head.T).argmax(1).eq(y_N[i: i + batch]).sum().item()
    model.train()
    return correct / len(y_N)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop early (for timing)")
    ap.add_argument("--init", default=None, help="continue from the weights in this model folder")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = (torch.from_numpy(a) for a in load_arrays("train"))
    x_test, y_test = (torch.from_numpy(a) for a in load_arrays("test"))
    model, tok = make_model(), build_byte_tokenizer()
    if args.init:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(args.init)
    model.train()
    steps_per_epoch = len(y_train) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = min(500, total // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    n_cls, n_tpl = len(CLASS_NAMES), len(EMBEDDED_TEMPLATES)
    t0, step = time.time(), 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size: (b + 1) * args.batch_size]
            x, y = to_pixels(augment(x_train[idx], gen)), y_train[idx]
            tpl = torch.randint(0, n_tpl, (n_cls,), generator=gen).tolist()
            txt = text_embeds(model, tok, [EMBEDDED_TEMPLATES[t].format(c) for t, c in zip(tpl, CLASS_NAMES)])
            img = F.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)
            scale = model.logit_scale.exp().clamp(max=100)
            logits_BC = scale * img @ txt.T
            loss_i2t = F.cross_entropy(logits_BC, y)
            present = torch.unique(y)
            target_CB = (y[None, :] == present[:, None]).float()
            target_CB = target_CB / target_CB.sum(1, keepdim=True)
            loss_t2i = -(target_CB * logits_BC.T[present].log_softmax(-1)).sum(1).mean()
            loss = 0.5 * (loss_i2t + loss_t2i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                acc = (logits_BC.argmax(1) == y).float().mean().item()
                print(f"epoch {epoch} step {step}/{total} loss {loss.item():.4f} batch-acc {acc:.3f} "
                      f"{(time.time() - t0) / step:.3f}s/step", flush=True)
            if args.max_steps and step >= args.max_steps:
                return
        acc = zero_shot_accuracy(model, tok, x_test, y_test)
        print(f"epoch {epoch} zero-shot test accuracy {acc:.4f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    preproc = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 28},
               "do_center_crop": True, "crop_size": {"height": 28, "width": 28}, "do_normalize": True,
               "image_mean": [MEAN] * 3, "image_std": [STD] * 3, "do_convert_rgb": True, "resample": 3}
    (out / "preprocessor_config.json").write_text(json.dumps(preproc, indent=2) + "\n")
    prev = json.loads((Path(args.init) / "training_info.json").read_text()) if args.init else None
    info = {"command": " ".join(["scripts/train_embedded.py"] + sys.argv[1:]), "previous": prev,
            "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "zero_shot_test_accuracy": acc, "templates": list(EMBEDDED_TEMPLATES),
            "class_names": list(CLASS_NAMES), "seconds": round(time.time() - t0, 1)}
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
