"""``ppfr demo``: the frequency-domain client transforms of the three Tencent methods on a batch of faces, timed
per backend, with a picture."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ppfr.data.synthetic import synthetic_faces


def _load_folder(root: Path, n: int, size: int = 112) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if not files:
        raise SystemExit(f"ppfr demo: no .jpg/.png images under {root}")
    out, bad = [], 0
    for p in files:
        try:
            with Image.open(p) as im:
                arr = torch.frombuffer(bytearray(im.convert("RGB").resize((size, size)).tobytes()), dtype=torch.uint8)
        except OSError:
            bad += 1  # corrupt or truncated: skip and count
            continue
        out.append(arr.view(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1)
    if bad:
        print(f"ppfr demo: skipped {bad} unreadable image(s)")
    if not out:
        raise SystemExit(f"ppfr demo: none of the images under {root} could be read")
    return torch.stack(out)


def _save_grid(rows: list[torch.Tensor], path: Path) -> None:
    from PIL import Image

    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*H, cols*W) in [0,1]
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _stretch(img: torch.Tensor) -> torch.Tensor:
    """Per-image min-max stretch to [0, 1] for display."""
    lo = img.amin(dim=(1, 2, 3), keepdim=True)
    hi = img.amax(dim=(1, 2, 3), keepdim=True)
    return (img - lo) / (hi - lo).clamp_min(1e-12)


def _timed(fn, repeat: int = 3) -> tuple[torch.Tensor, float]:
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def cmd_demo(args: argparse.Namespace) -> int:
    from ppfr import _backend
    from ppfr.ops import freq

    x = _load_folder(Path(args.data), args.batch) if args.data else synthetic_faces(args.batch, seed=args.seed)
    b = x.shape[0]
    src = args.data or "synthetic faces"
    print(f"ppfr demo: {b} images of {tuple(x.shape[1:])} from {src}; torch threads {torch.get_num_threads()}")
    g = torch.Generator().manual_seed(args.seed)
    low = [0, 1, 2, 3, 4, 5, 8, 9, 16, 24]
    duet_client = torch.tensor([64 * c + k for c in range(3) for k in low])
    duet_server = torch.tensor([ch for ch in range(192) if ch not in set(duet_client.tolist())])
    ranks = torch.stack([torch.randperm(192, generator=g)[:27] for _ in range(b)])
    perm = torch.stack([torch.randperm(192, generator=g) for _ in range(b)])

    backends = [be for be in ("torch", "cpp") if _backend.unavailable_reason(be, x.device) is None]
    if args.backend != "auto":
        backends = [args.backend]
    print(f"{'transform':<38}{'backend':<9}{'ms':>9}{'img/s':>10}  output")
    ref_n = min(b, 8)
    _, t_ref = _timed(lambda: freq.freq_encode_ref(x[:ref_n]), repeat=1)
    print(
        f"{'e(X), all 192 channels (reference)':<38}{'ref':<9}{t_ref * 1e3:9.1f}{ref_n / t_ref:10.1f}  on {ref_n} images"
    )
    cases = [
        ("e(X), all 192 channels", None),
        ("DuetFace client, 30 low channels", duet_client),
        ("DuetFace server, 162 high channels", duet_server),
        ("PartialFace rank, 27 per-sample", ranks),
    ]
    full = None
    for be in backends:
        for name, ch in cases:
            out, t = _timed(lambda: freq.freq_encode(x, ch, backend=be))
            print(f"{name:<38}{be:<9}{t * 1e3:9.1f}{b / t:10.1f}  {tuple(out.shape)}")
            if ch is None:
                full = out
        rec, t = _timed(lambda: freq.freq_decode(full, backend=be))
        print(f"{'d(e(X)) round trip':<38}{be:<9}{t * 1e3:9.1f}{b / t:10.1f}  {tuple(rec.shape)}")
        shuf, t = _timed(lambda: freq.freq_decode(full, None, perm, backend=be))
        print(f"{'MinusFace-style d(shuffle(e(X)))':<38}{be:<9}{t * 1e3:9.1f}{b / t:10.1f}  {tuple(shuf.shape)}")
    rmse = (rec - (x * 0.5 + 0.5)).pow(2).mean().sqrt().item()
    ref_err = (full[:ref_n] - freq.freq_encode_ref(x[:ref_n])).abs().max().item()
    print(f"round-trip RMSE on [0,1]: {rmse:.2e} (METHODS §2.3: ~1e-4 smooth .. 2.7e-2 white noise)")
    print(f"max |fast - reference| over {ref_n} images: {ref_err:.2e} (coefficients span +-{full.abs().max():.0f})")
    hf = freq.freq_hflip(full[:ref_n])
    flip_err = (hf - freq.freq_encode_ref(x[:ref_n].flip(-1))).abs().max().item()
    print(f"frequency-domain flip vs encode of flipped image: max diff {flip_err:.2e}")
    n = min(b, 6)
    server_only = freq.freq_decode(full[:n, duet_server], duet_server)
    rank_only = freq.freq_decode(torch.stack([full[i, ranks[i]] for i in range(n)]), ranks[:n])
    out = Path(args.out) / "demo_freq.png"
    _save_grid([x[:n] * 0.5 + 0.5, rec[:n], _stretch(server_only), _stretch(rank_only), shuf[:n]], out)
    print(
        f"wrote {out}: rows = input, d(e(X)), DuetFace server view, PartialFace rank view (both contrast-"
        "stretched: high frequencies of the 8x up-sampled image are faint), MinusFace-style shuffled decode"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ppfr demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="an image folder (default: embedded synthetic faces)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton", "cuda"])
    ap.add_argument("--out", default="runs/demo")
    return cmd_demo(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
