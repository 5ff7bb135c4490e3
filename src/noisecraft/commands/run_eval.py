"""`noisecraft eval RUN`: likelihood and sample quality of a trained run, written into the run as eval.json and
eval.md (with a sample grid and a plot of the bound's per-timestep terms).

    noisecraft eval runs/mnist --nll --n 1000                   # the variational bound in bits/dim (DDPM eq. 5)
    noisecraft eval runs/mnist --ode --n 100                    # exact bits/dim through the probability-flow ODE
    noisecraft eval runs/mnist --fid --samples 1000             # domain FID/KID, precision/recall, classifier scores
    noisecraft eval runs/mnist --fid --inception pt_inception-2015-12-05-6726825d.pth   # + the standard FID/KID
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..errors import NoisecraftError
from .arg_types import count, finite_float, positive_int


def _test_images(config, args, n: int):
    from ..data.datasets import load_dataset
    data = load_dataset(config.data.dataset, split=args.split, data_dir=args.data_dir,
                        image_size=config.data.image_shape[1])
    labels = data.labels[:n].long() if data.labels is not None else None
    return data, data.images[:n], labels                                 # uint8 N×C×H×W


def _summary(values: torch.Tensor) -> dict:
    values = values.double()
    n = values.numel()
    stderr = float(values.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(values.mean()), "stderr": stderr, "ci95": [float(values.mean()) - 1.96 * stderr,
                                                                      float(values.mean()) + 1.96 * stderr], "n": n}


def _plot_terms(terms: torch.Tensor, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = torch.arange(len(terms))
    keep = ~torch.isnan(terms)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].semilogy(t[keep], terms[keep].clamp_min(1e-8), ".", ms=3)
    axes[0].set(xlabel="timestep t", ylabel="bits/dim of L_t", title="terms of the bound")
    share = torch.nan_to_num(terms).cumsum(0) / torch.nan_to_num(terms).sum()
    axes[1].plot(t, share)
    axes[1].set(xlabel="timestep t", ylabel="share of the bound from steps ≤ t", title="cumulative share")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _run_kind(run: Path) -> str | None:
    """The "kind" a run's config.json declares (train-vae / train-vdm runs), None for diffusion runs."""
    from ..io.checkpoint import load_json
    config = load_json(run / "config.json") if (run / "config.json").is_file() else {}
    return config.get("kind") if isinstance(config, dict) else None


def cmd_eval(args) -> int:
    from ..pipelines.diffusion import DiffusionPipeline

    if not (args.nll or args.ode or args.fid):
        raise NoisecraftError("say what to measure: --nll (variational bound), --ode (exact likelihood) and/or --fid.")
    run = Path(args.run)
    if _run_kind(run) == "vdm":
        return _eval_vdm(args, run)
    pipe = DiffusionPipeline.from_run(run, device=args.device)
    config = pipe.config
    if (args.nll or args.ode) and config.latent is not None:
        raise NoisecraftError("bits/dim is defined here for pixel-space runs; this run works on VAE latents.")
    report = {"run": str(run), "split": args.split, "dataset": config.data.dataset}
    lines = [f"# Evaluation of {run.name}", "", f"dataset {config.data.dataset}, split {args.split}", ""]
    generator = torch.Generator().manual_seed(args.seed)
    if args.nll or args.ode:
        _, images, labels = _test_images(config, args, args.n)
        cond = labels if config.model.num_classes else None
        x0 = images.float() / 127.5 - 1
    if args.nll:
        from ..likelihood import vlb_bits_per_dim
        t0 = time.perf_counter()
        steps = "all" if args.nll_steps == 0 else args.nll_steps
        with torch.no_grad():
            out = vlb_bits_per_dim(pipe.denoiser, pipe.schedule, x0, cond=cond, timesteps=steps, generator=generator,
                                   batch_size=args.batch_size)
        terms = out["terms"].double()
        report["nll_bound"] = {**_summary(out["total"]), "estimator": out["estimator"],
                               "calls_per_image": out.get("timesteps"), "prior_bpd": float(out["prior"].mean()),
                               "decoder_bpd": float(out["decoder"].mean()), "seconds": time.perf_counter() - t0,
                               "terms": [None if math.isnan(v) else v for v in terms.tolist()]}
        _plot_terms(terms, run / "eval_terms.png")
        b = report["nll_bound"]
        lines += ["## Variational bound (DDPM eq. 5)", "",
                  f"**{b['mean']:.3f} ± {b['stderr']:.3f} bits/dim** (n={b['n']}, {out['estimator']} estimator, "
                  f"{b['calls_per_image']} network calls per image)", "",
                  "| part | bits/dim |", "|---|---|", f"| L_T (prior) | {b['prior_bpd']:.5f} |",
                  f"| L_0 (discretized decoder) | {b['decoder_bpd']:.4f} |"]
        T = len(terms)
        for lo, hi in ((1, T // 100), (T // 100, T // 10), (T // 10, T // 2), (T // 2, T)):
            part = torch.nan_to_num(terms[lo:hi]).sum() if out["estimator"] == "exact" else \
                torch.nanmean(terms[lo:hi]) * (hi - lo)
            lines.append(f"| L_t, {lo} ≤ t < {hi} | {float(part):.4f} |")
        lines += ["", "![terms](eval_terms.png)", ""]
    if args.ode:
        from ..likelihood_ode import ode_bits_per_dim
        t0 = time.perf_counter()
        out = ode_bits_per_dim(pipe.denoiser, images, cond=cond, batch_size=args.batch_size, generator=generator,
                               rtol=args.rtol, atol=args.rtol, repeats=1,
                               **({"sigma_min": args.sigma_min} if args.sigma_min else {}))
        report["nll_ode"] = {**_summary(out["bpd"]), "nfe": out["nfe"], "rtol": args.rtol,
                             "seconds": time.perf_counter() - t0}
        o = report["nll_ode"]
        lines += ["## Probability-flow ODE (exact, Hutchinson)", "",
                  f"**{o['mean']:.3f} ± {o['stderr']:.3f} bits/dim** (n={o['n']}, uniform dequantization, "
                  f"rtol {args.rtol}, {o['nfe']:.0f} function evaluations per batch)", ""]
    if args.fid:
        labels = (torch.arange(args.samples) % config.model.num_classes) if config.model.num_classes else None
        samples = pipe.sample(args.samples, label=labels, seed=args.seed).images
        _sample_quality(report, lines, samples, labels, config.data.dataset, config.data.image_shape[1], run, args,
                        "the run's default sampler")
    _write_report(report, lines, run)
    return 0


def _sample_quality(report: dict, lines: list, samples, labels, dataset: str, size: int, run: Path, args,
                    how: str) -> None:
    """Domain FID/KID, precision/recall and classifier scores of `samples` against the split (report + eval.md)."""
    from ..data.datasets import load_dataset
    from ..evaluation.classifier import load_or_train_classifier
    from ..evaluation.metrics import sample_quality
    from ..viz.images import save_grid
    inception = None
    if args.inception:
        from ..evaluation.inception import load_fid_inception
        inception = load_fid_inception(args.inception)
    classifier = load_or_train_classifier(dataset, data_dir=args.data_dir, progress=False)
    reference = load_dataset(dataset, split=args.split, data_dir=args.data_dir, image_size=size)
    save_grid(samples[:64], run / "eval_samples.png")
    quality = sample_quality(samples, reference, classifier=classifier, inception=inception, labels=labels)
    report["sample_quality"] = quality
    lines += ["## Sample quality", "", f"{args.samples} samples ({how}), against the "
              f"{args.split} split. The domain scores use a small classifier trained on the dataset: they are "
              "NOT comparable to published Inception FID.", "", "| metric | value |", "|---|---|"]
    for key in ("fid", "kid", "domain_fid", "domain_kid", "precision", "recall"):
        if key in quality:
            lines.append(f"| {key} | {quality[key]:.4g} |")
    for key in ("accuracy", "entropy"):
        if key in quality["classifier"]:
            lines.append(f"| classifier {key} | {quality['classifier'][key]:.4g} |")
    lines += ["", "![samples](eval_samples.png)", ""]


def _write_report(report: dict, lines: list, run: Path) -> None:
    from ..io.checkpoint import save_json
    save_json(report, run / "eval.json")
    (run / "eval.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for key in ("nll_bound", "nll_ode"):
        if key in report:
            print(f"{key}: {report[key]['mean']:.3f} ± {report[key]['stderr']:.3f} bits/dim (n={report[key]['n']})")
    if "sample_quality" in report:
        q = report["sample_quality"]
        print(f"domain FID {q['domain_fid']:.3f}, precision {q['precision']:.3f}, recall {q['recall']:.3f}")
    print(f"wrote {run / 'eval.json'} and {run / 'eval.md'}")


def _eval_vdm(args, run: Path) -> int:
    """`eval` of a train-vdm run: its continuous-time bound (--nll) and the quality of its samples (--fid)."""
    from ..data.datasets import load_dataset
    from ..training.vdm_trainer import load_vdm, vdm_bits_per_dim
    if args.ode:
        raise NoisecraftError("the probability-flow ODE is implemented for DDPM-family runs; a VDM run reports its "
                              "continuous-time bound with --nll.")
    model, config = load_vdm(run, device=args.device)
    dataset, h = config["data"]["dataset"], config["data"]["image_shape"][1]
    report = {"run": str(run), "split": args.split, "dataset": dataset, "kind": "vdm"}
    lines = [f"# Evaluation of {run.name} (variational diffusion model)", "", f"dataset {dataset}, split {args.split}",
             ""]
    generator = torch.Generator().manual_seed(args.seed)
    if args.nll:
        data = load_dataset(dataset, split=args.split, data_dir=args.data_dir, image_size=h).subset(args.n)
        t0 = time.perf_counter()
        out = vdm_bits_per_dim(model, data, batch_size=args.batch_size, generator=generator)
        report["nll_bound"] = {"mean": out["mean"], "stderr": out["stderr"], "n": out["n"],
                               "ci95": [out["mean"] - 1.96 * out["stderr"], out["mean"] + 1.96 * out["stderr"]],
                               "estimator": "continuous-time, one t per image",
                               **{k: out[k] for k in ("diffusion", "prior", "reconstruction")},
                               "seconds": time.perf_counter() - t0}
        b = report["nll_bound"]
        lines += ["## Variational bound (VDM, continuous time)", "",
                  f"**{b['mean']:.3f} ± {b['stderr']:.3f} bits/dim** (n={b['n']})", "", "| part | bits/dim |",
                  "|---|---|", f"| diffusion | {b['diffusion']:.4f} |", f"| prior | {b['prior']:.5f} |",
                  f"| reconstruction | {b['reconstruction']:.4f} |", ""]
    if args.fid:
        with torch.no_grad():
            samples = torch.cat([model.sample(min(args.batch_size, args.samples - i), generator=generator)
                                 for i in range(0, args.samples, args.batch_size)]).cpu()
        _sample_quality(report, lines, samples, None, dataset, h, run, args, "ancestral sampling, 256 steps")
    _write_report(report, lines, run)
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", help="likelihood (bits/dim) and sample quality of a run -> RUN/eval.json, eval.md")
    e.add_argument("run")
    e.add_argument("--nll", action="store_true", help="the variational bound in bits/dim")
    e.add_argument("--nll-steps", type=count, default=20,
                   help="timesteps per image for the bound's unbiased estimate (0: all T, the exact bound)")
    e.add_argument("--ode", action="store_true", help="exact bits/dim through the probability-flow ODE")
    e.add_argument("--rtol", type=finite_float(positive=True), default=1e-4, help="ODE solver tolerance")
    e.add_argument("--sigma-min", type=finite_float(positive=True), default=None,
                   help="ODE: start of the integration (default σ at t=0)")
    e.add_argument("--fid", action="store_true", help="sample quality: domain FID/KID, precision/recall, classifier")
    e.add_argument("--inception", default=None, help="with --fid: local FID Inception weights (pytorch-fid's .pth)")
    e.add_argument("--n", type=positive_int, default=1000, help="test images for --nll / --ode")
    e.add_argument("--samples", type=positive_int, default=1000, help="samples for --fid")
    e.add_argument("--split", default="test")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--batch-size", type=positive_int, default=250)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_eval)
