"""Do fewer DDIM steps change the judge's scores (and CLIP-I) by more than sampling noise? (one benchmark run)

    python train.py -m +experiment=text_guided                    # 9 runs: TI, hypernetwork, LoRA x 3 seeds
    python scripts/bench_judge_steps.py outputs/multirun/<date>_<time>/*/ --steps 10 15

For every run (its concept installed at full strength), the judge scores the concept set's own prompts
at seeds 0..n-1 with the reference number of DDIM steps (25, the evaluation default), at seeds n..2n-1
with the same steps (the sampling noise: another draw of the same evaluation) and at seeds 0..n-1 with
each candidate number of steps; the same images' CLIP-I against the concept's pictures with the toy
world's CLIP (`--clip`, what `protocol=toy` metrics read). Prints JSON: per run and candidate the
change of judge/concept, judge/prompt and clip_i, and over all runs the mean absolute change beside
the noise's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def scores_for(
    run_dir: Path, step_counts: list[int], samples: int, reference: int, guidance: float, encoders=None
) -> dict:
    from conceptlab.inference import prepare
    from conceptlab.prompts import fill_prompt
    from conceptlab.runfolder import RunFolder
    from conceptlab.toyworld.checkpoint import load_judge
    from conceptlab.toyworld.concepts import TOY_CONCEPTS
    from conceptlab.toyworld.evaluate import sample_images, score

    folder = RunFolder(run_dir)
    inference = prepare([folder.concepts], folder.composed_config().model, "cpu")
    backbone, concepts = inference.backbone, inference.concepts
    judge = load_judge(Path(backbone.path))
    name = folder.read_record()["concept"]
    concept = TOY_CONCEPTS[name]
    # A placeholder word where TI learned one; the name a tagged method trained with, and its tag, else.
    filled = [f"{fill_prompt(p, concepts[0].name)} {inference.tags()}".strip() for p in concept.prompts]
    texts = [inference.prompt(p) for p in filled]

    real = None
    if encoders is not None:
        from PIL import Image

        from conceptlab.data import resolve_data_path

        pictures = sorted(resolve_data_path(f"bundled:{name}").glob("*.png"))
        real = encoders.image_features([Image.open(p).convert("RGB") for p in pictures])

    def judged(seeds: list[int], steps: int) -> dict[str, float]:
        images = sample_images(backbone, texts, seeds, steps, guidance)
        out = score(judge, images, list(concept.prompts), dict(concept.truth)).metrics("")
        if real is not None:
            from conceptlab.inference import to_pil
            from conceptlab.metrics import score_images

            values = score_images(encoders, to_pil((images + 1) / 2), real).values["clip_i"]
            out["clip_i"] = sum(values) / len(values)
        return out

    first, second = list(range(samples)), list(range(samples, 2 * samples))
    out = {"reference": judged(first, reference), "noise": judged(second, reference)}
    for steps in step_counts:
        out[f"steps_{steps}"] = judged(first, steps)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of the toy world (model=toy)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 15], help="candidate DDIM step counts")
    parser.add_argument("--reference", type=int, default=25, help="the DDIM steps evaluations use now")
    parser.add_argument("--samples", type=int, default=16, help="seeds per prompt (evaluate.num_samples)")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--clip", default="pkg://conceptlab.toyworld/checkpoint/clip",
                        help="CLIP model for clip_i (the toy world's); 'none' to skip")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    from conceptlab.errors import ConceptLabError, error_line

    torch.manual_seed(0)
    encoders = None
    if args.clip != "none":
        from conceptlab.metrics import Encoders

        encoders = Encoders(clip=args.clip, dino=None)
    per_run = {}
    for run in args.runs:
        if not ((run / "summary.json").is_file() and (run / ".hydra" / "config.yaml").is_file()):
            print(
                f"skipped {run}: not a run folder (no summary.json and .hydra/config.yaml)", file=sys.stderr
            )
            continue
        try:
            per_run[str(run)] = scores_for(
                run, args.steps, args.samples, args.reference, args.guidance, encoders
            )
        except (ConceptLabError, KeyError) as err:  # another model's run, a concept set without a truth
            print(f"skipped {run}: {error_line(err)}", file=sys.stderr)
    if not per_run:
        raise SystemExit(
            "no run folders among the arguments: pass the runs of a toy-world sweep (<sweep>/*/)"
        )
    summary = {}
    for key in ("concept", "prompt", "clip_i"):
        for what in ["noise", *(f"steps_{s}" for s in args.steps)]:
            changes = [r[what][key] - r["reference"][key] for r in per_run.values() if key in r["reference"]]
            if not changes:
                continue
            summary[f"{key}/{what}"] = {
                "mean_abs_change": round(sum(abs(c) for c in changes) / len(changes), 4),
                "mean_change": round(sum(changes) / len(changes), 4),
                "largest_change": round(max(abs(c) for c in changes), 4),
                "runs": len(changes),
            }
    report = {"reference_steps": args.reference, "samples": args.samples, "summary": summary, "runs": per_run}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
