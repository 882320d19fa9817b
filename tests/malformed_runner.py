"""Run every reading command on every file of a folder of malformed inputs, in this one process, under an
address-space limit; print one JSON line per run: exit code, stderr lines, whether a traceback appeared.

    python tests/malformed_runner.py FOLDER LIMIT_GB
"""
import contextlib
import io
import json
import resource
import sys
from pathlib import Path


def commands(path: Path, work: Path) -> list[list[str]]:
    p = str(path)
    if path.suffix == ".npz":
        return [["evaluate", "--npz", p, "--ref-data", "digits", "--ref-limit", "20", "--cache-dir", str(work / "c"),
                 "--no-progress"]]
    runs = [["sample", p, "--num-sampling-steps", "2", "--out", str(work / "g.png")],
            ["analyze", p, "--out", str(work / "an")],
            ["evaluate", "--ckpt", p, "--num-samples", "10", "--num-sampling-steps", "2", "--ref-limit", "20",
             "--features", "fmnist-classifier", "--cache-dir", str(work / "c"), "--no-progress"]]
    if path.suffix == ".pt":
        runs += [["export", p, "--out", str(work / "e.safetensors")],
                 ["train", "--data", "digits", "--image-size", "8", "--model", "Switch-DiT-XS/2", "--global-batch-size",
                  "8", "--max-steps", "3", "--resume", p, "--results-dir", str(work / "r"), "--tensorboard", "false",
                  "--no-progress"]]
    return runs


def main():
    folder, limit_gb = Path(sys.argv[1]), float(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), int(limit_gb * 2**30)))
    from switch_dit.cli import main as cli

    work = folder.parent / "work"
    work.mkdir(exist_ok=True)
    for path in sorted(folder.iterdir()):
        for args in commands(path, work):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = cli(args)
                except SystemExit as e:  # argparse
                    code = e.code
                except BaseException as e:  # noqa: BLE001 - an escaped exception is what this looks for
                    code = f"escaped {type(e).__name__}: {e}"
            text = err.getvalue().strip()
            lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("[switch-dit] warning",
                                                                                           "  warnings.warn"))]
            print(json.dumps({"file": path.name, "command": args[0], "code": code, "lines": lines,
                              "traceback": "Traceback" in text}), flush=True)


if __name__ == "__main__":
    main()
