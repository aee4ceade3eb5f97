"""MkDocs hook: links from docs/ to files of the repository outside docs/.

The pages under docs/ are read in two places: in the repository (on a forge or in an editor),
where a relative link such as `../bench/results/busy-cpu-2core.json` opens the result file, and
as the site `mkdocs build` makes, which holds docs/ only. MkDocs cannot tell such a link from a
link to a missing page (both are "not found among documentation files"), and in strict mode
both fail the build. This hook keeps the two apart before MkDocs validates a page:

- a link that leaves docs/ must name a file or folder that exists in the repository, or the
  build fails (a typo in a link to a result file is caught like a missing page);
- in the site such a link becomes the file's repository path in code type (the site hosts no
  copy of bench/results/, and no repository address is configured that a link could point to).

Every other link, to a page or an image under docs/, is left to MkDocs' own checks.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

# [text](target) or ![alt](target); a target without spaces, an optional "title" after it.
LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^)\s]+)(\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _outside_target(page_src_uri: str, target: str) -> str | None:
    """The repository path a relative link leads to when it leaves docs/, else None."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("/", "#")):
        return None
    path = target.split("#", 1)[0].split("?", 1)[0]
    joined = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_src_uri), path))
    return None if joined == "docs" or joined.startswith("docs/") else joined


def _rewrite_line(line: str, page_src_uri: str, root: Path, missing: list[str]) -> str:
    spans = [m.span() for m in CODE_SPAN.finditer(line)]

    def replace(match: re.Match) -> str:
        if any(start <= match.start() < end for start, end in spans):
            return match.group(0)  # inside `code`: not a link
        bang, text, target = match.group(1), match.group(2), match.group(3)
        repo_path = _outside_target(page_src_uri, target)
        if repo_path is None:
            return match.group(0)
        if repo_path.startswith("../") or not (root / repo_path).exists():
            missing.append(target)
            return match.group(0)
        shown = f"`{repo_path}`"
        if bang or text.strip("`") in (repo_path, repo_path.rstrip("/"), repo_path + "/", ""):
            return shown
        return f"{text} ({shown})"

    return LINK.sub(replace, line)


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = Path(config["config_file_path"]).resolve().parent
    missing: list[str] = []
    out, fenced = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            out.append(line)
            continue
        out.append(line if fenced else _rewrite_line(line, page.file.src_uri, root, missing))
    if missing:
        raise PluginError(f"Doc file '{page.file.src_uri}' links to files outside docs/ that do not exist in the "
                          f"repository: {', '.join(missing)}")
    return "\n".join(out)
