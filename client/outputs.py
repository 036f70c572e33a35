"""The files a run's outputs name, and downloading them to a local folder (safe, unique names)."""
from __future__ import annotations

import os
import re
import urllib.parse


def _safe_relpath(subfolder: str, filename: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", subfolder or "") if p not in ("", ".", "..")]
    name = os.path.basename((filename or "").replace("\\", "/")) or "output"
    return os.path.join(*parts, name)


def _unique(path: str) -> str:
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(f"{stem}-{i}{ext}"):
        i += 1
    return f"{stem}-{i}{ext}"


def output_files(node_outputs: dict) -> list[tuple[str, dict]]:
    """(node id, file entry) for every file the outputs name: {"filename", "subfolder", "type"} dicts
    under any key (images, gifs, audio, video, 3d, ...)."""
    files = []
    for nid, out in (node_outputs or {}).items():
        if not isinstance(out, dict):
            continue
        for value in out.values():
            if isinstance(value, list):
                files += [(nid, v) for v in value if isinstance(v, dict) and v.get("filename")]
    return files


def download_outputs(http, node_outputs: dict, out_dir: str | os.PathLike) -> list[str]:
    """Downloads every file the outputs name (GET /view) under `out_dir`; their local paths."""
    paths = []
    for nid, f in output_files(node_outputs):
        dest = _unique(os.path.join(os.fspath(out_dir), _safe_relpath(f.get("subfolder", ""), f["filename"])))
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        q = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f.get("subfolder", ""),
                                    "type": f.get("type", "output")})
        http.download(f"/view?{q}", dest)
        paths.append(dest)
    return paths
