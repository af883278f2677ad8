"""The ``signedrec`` command line: train, evaluate, serve, versions, build-default."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from server.default import DEFAULT_ARTIFACTS, build_default
from server.errors import SignedrecError

if TYPE_CHECKING:
    from server.data import Dataset

EXIT_USAGE = 2


def check_directory(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is a writable directory or could be created (creates nothing)."""
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise SignedrecError(f"{what} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise SignedrecError(f"{what} {path}: directory is not writable")
        return
    ancestor = path.absolute().parent
    while not (ancestor.exists() or ancestor.is_symlink()):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SignedrecError(f"{what} {path}: cannot be created, {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SignedrecError(f"{what} {path}: cannot be created, {ancestor} is not writable")


def _cmd_train(args: argparse.Namespace) -> int:
    from server.artifacts import is_version
    from server.config import load_config
    from server.train import RankingChoice, train

    config = load_config(args.config)
    # Checked before training: a bad --out would otherwise fail only once training is done.
    check_directory(Path(args.out), "--out")
    if is_version(Path(args.out)):  # a version inside a version: listed and served by nothing
        raise SignedrecError(f"--out {args.out}: is an artifact version; give its root, "
                             f"{Path(os.path.abspath(args.out)).parent}")  # fmt: skip
    fixed = None
    fixed_ranking = None
    if args.hyper_from is not None:
        from server.artifacts import load_artifact
        from server.config import Hyper
        from server.errors import ArtifactError

        # Loaded and verified, as every other artifact a command takes: a corrupt one is refused.
        artifact = load_artifact(Path(args.hyper_from))
        source, manifest = artifact.path, artifact.manifest
        try:
            fixed = msgspec.convert(manifest["model"]["hyper"], Hyper, strict=False)
            fixed_ranking = RankingChoice.of(manifest, config.model)
        except (KeyError, TypeError, ValueError, msgspec.ValidationError) as exc:
            raise ArtifactError(
                f"{source}/manifest.json: no usable model.hyper ({type(exc).__name__}: {exc})"
            ) from None
    events = None if args.events is None else Path(args.events)
    since = None if args.since is None else Path(args.since)
    path = train(Path(args.data), args.threshold, Path(args.out), config.model, fixed=fixed,
                 events=events, weights=config.events, since=since,
                 history_cap=config.server.history_max_limit,
                 suppression_recent=config.ranking.suppression_recent,
                 fixed_ranking=fixed_ranking)  # fmt: skip
    print(path)
    return 0


def _first_row_beyond(
    dataset: Dataset, directory: Path, column: str, bound: int
) -> tuple[str, int, int]:
    """The split file and (user, item) of the first row whose ``column`` id is >= bound."""
    for name in ("train", "valid", "test"):
        part = getattr(dataset, name)
        rows = np.flatnonzero(getattr(part, column) >= bound) if part is not None else []
        if len(rows):
            first = rows[0]
            return str(directory / f"{name}.txt"), int(part.users[first]), int(part.items[first])
    raise ValueError(f"no {column} id reaches {bound}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from server.artifacts import load_artifact
    from server.data import load_dataset
    from server.errors import DataError
    from server.evaluate import evaluate_scores, ground_truth, held_out, interaction_matrix
    from server.graph import build_graph

    artifact = load_artifact(Path(args.artifact))
    threshold = artifact.threshold if args.threshold is None else args.threshold
    dataset = load_dataset(Path(args.data), threshold, require_test=args.split == "test")
    split = getattr(dataset, args.split)
    n_items = artifact.arrays["item_table"].shape[0]
    if dataset.n_items > n_items:
        path, user, item = _first_row_beyond(dataset, Path(args.data), "items", n_items)
        raise DataError(
            path, None,
            f"the row of user {user} and item {item} names an item beyond the {n_items} the "
            f"artifact knows (ids 0-{n_items - 1})",
        )  # fmt: skip
    if artifact.watermark > 0 and artifact.manifest["dataset"].get("fingerprint") == (
        dataset.fingerprint
    ):
        # Trained on this data plus a server's log: users as the model knows them, and split
        # rows that the log holds are train input, not held out (as when it was trained).
        # Rows past the dataset's users there are users the log created: a split naming such
        # an id (a test file added since) would be scored with another user's feedback.
        trained_users = int(artifact.manifest["dataset"].get("n_users", dataset.n_users))
        if dataset.n_users > trained_users:
            path, user, item = _first_row_beyond(dataset, Path(args.data), "users", trained_users)
            raise DataError(
                path, None,
                f"the row of user {user} and item {item} names a user beyond the "
                f"{trained_users} of the data this artifact was trained on (later ids are users "
                "its log created): evaluate it on the data it was trained on",
            )  # fmt: skip
        graph = artifact.trained_graph()
        masked = interaction_matrix(*graph.edges()[:2], graph.n_users, n_items)
        split, inside = held_out(split, masked)
        print(f"users from the artifact's graph (its data and the log up to seq "
              f"{artifact.watermark}); {inside} {args.split} rows are in it, not held out",
              file=sys.stderr)  # fmt: skip
    else:
        inside = 0
        graph = build_graph(dataset.train, threshold, dataset.n_users, n_items)
        masked = interaction_matrix(dataset.train.users, dataset.train.items, dataset.n_users,
                                    n_items)  # fmt: skip
    z = graph.signed_input(artifact.neg_weight)
    table, vectors = artifact.arrays["item_table"], artifact.arrays["item_vectors"]
    truth = ground_truth(split, threshold, graph.n_users, n_items)
    if len(truth.users) == 0:
        why = (f"is --threshold {threshold:g} right?" if not inside else
               f"{inside} of its rows are in the artifact's graph (its training read them from "
               "a server's log), so they are not held out")  # fmt: skip
        raise DataError(
            str(Path(args.data) / f"{args.split}.txt"),
            None,
            f"no user has a positive (rating >= {threshold:g}) in the {args.split} split to "
            f"evaluate against; {why}",
        )

    def model_scores(users: np.ndarray) -> np.ndarray:
        return (z[users] @ table) @ vectors.T

    score = model_scores
    if args.served:  # torch comes with the trainer: imported only when asked for
        from server.train import artifact_served_scores

        score = artifact_served_scores(artifact, graph)
    metrics = evaluate_scores(score, truth, masked)
    result = {k: v for k, v in metrics.items() if not k.startswith(("hitrate", "mrr"))}
    result["users"] = int(metrics["users"])
    extras = {k: v for k, v in metrics.items() if k.startswith(("hitrate", "mrr"))}
    if args.json:
        print(json.dumps({**result, **extras}))
    else:
        for key, value in {**result, **extras}.items():
            print(f"{key:>14s} {value:.4f}" if isinstance(value, float) else f"{key:>14s} {value}")
    return 0


def _cmd_versions(args: argparse.Namespace) -> int:
    from server.artifacts import inspect_version, numeric_metrics, root_of, scan_root

    root = Path(args.root)
    if not root.is_dir():
        raise SignedrecError(f"{root}: no such artifact root (a directory of versions)")
    root = root_of(Path(os.path.abspath(root)))  # a version dir lists its root's versions
    versions, unreadable = scan_root(root)
    for version in sorted(versions + unreadable):
        # One bad version must not hide the others; a reload would refuse it at once.
        manifest, problem = inspect_version(root / version)
        if manifest is None or problem is not None:
            print(version, f"unusable: {problem}")
            continue
        metrics = manifest.get("metrics")
        test = numeric_metrics(metrics.get("test") if isinstance(metrics, dict) else None)
        # The watermark tells an operator which logged events a version holds (log retention).
        print(version, f"ndcg@20(test)={test.get('ndcg@20', math.nan):.4f}",
              f"watermark={int(manifest.get('watermark', 0))}")  # fmt: skip
    return 0


def _cmd_build_default(args: argparse.Namespace) -> int:
    path = build_default(args.force)
    print(path if path is not None else f"default artifact present under {DEFAULT_ARTIFACTS}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.config import PORT_MAX, PORT_MIN, load_config
    from server.errors import ConfigError

    # The arguments are checked here, before anything binds or loads: serve() would take an
    # empty --host for "use the config's" and pass a bad port to bind (an OverflowError).
    if args.host is not None and not args.host.strip():
        raise ConfigError("--host must not be empty")
    if args.port is not None and not PORT_MIN <= args.port <= PORT_MAX:
        raise ConfigError(f"--port must be between {PORT_MIN} and {PORT_MAX}, got {args.port}")
    config = load_config(args.config)
    # server.log_level is the whole process's: signedrec's own lines as well as the HTTP front's.
    logging.getLogger().setLevel(config.server.log_level.upper())
    from server.api import default_state_dir, serve  # the HTTP stack: only once args are good

    artifact = DEFAULT_ARTIFACTS if args.artifact is None else Path(args.artifact)
    # The state dir as serve() resolves it; it is created only once the port is bound.
    state_dir = args.state_dir or config.server.state_dir or default_state_dir(artifact)
    check_directory(Path(state_dir), "state dir")
    return serve(args)


def path_arg(text: str) -> str:
    """A path argument; an empty one is refused (``Path("")`` is the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def config_arg(text: str) -> Path:
    """A config file argument (not empty)."""
    return Path(path_arg(text))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; kept separate so tests can check the contract."""
    parser = argparse.ArgumentParser(prog="signedrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on DIR/train.txt, select on DIR/valid.txt")
    p.add_argument("--data", type=path_arg, required=True,
                   help="directory with train.txt and valid.txt")  # fmt: skip
    p.add_argument("--threshold", required=True, type=float, help="rating >= T is positive")
    p.add_argument("--out", type=path_arg, required=True,
                   help="artifact root; a new version is written under it")  # fmt: skip
    p.add_argument("--config", type=config_arg, default=None, help="TOML config file")
    p.add_argument(
        "--hyper-from",
        type=path_arg,
        default=None,
        help="refit with this artifact's hyper-parameters and serving strengths, no search",
    )
    p.add_argument(
        "--events",
        type=path_arg,
        default=None,
        help="also train on a server's logged feedback (its state dir or event log dir, read "
        "without stopping it); the server then replays only later events",
    )
    p.add_argument(
        "--since",
        type=path_arg,
        default=None,
        help="with --events: start from this version's graph (same data, same log) and read "
        "only the events after its watermark; needed once the log's old segments are dropped",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate an artifact with the datasets' protocol")
    p.add_argument("--artifact", type=path_arg, required=True,
                   help="artifact version dir or root (newest)")  # fmt: skip
    p.add_argument("--data", type=path_arg, required=True)
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--threshold", type=float, default=None, help="default: the artifact's")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--served", action="store_true",
        help="rank as the server does at the default config: with the artifact's dislike "
        "suppression (over each user's last ranking.suppression_recent dislikes) and propensity",
    )  # fmt: skip
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("versions", help="list artifact versions under a root")
    p.add_argument("root", nargs="?", type=path_arg, default=str(DEFAULT_ARTIFACTS))
    p.set_defaults(func=_cmd_versions)

    p = sub.add_parser("build-default", help="train the embedded default from in-repo data")
    p.add_argument("--force", action="store_true", help="train a new version even if one exists")
    p.set_defaults(func=_cmd_build_default)

    p = sub.add_parser("serve", help="serve recommendations over HTTP")
    p.add_argument("--artifact", type=path_arg, default=None, help="default: the embedded default")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--state-dir", type=path_arg, default=None, help="event log and snapshots")
    p.add_argument("--config", type=config_arg, default=None)
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command; expected failures print one clear line and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SignedrecError as exc:
        print(f"signedrec {args.command}: error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
