"""The docs' own links: every relative link in the Markdown files names a file of the repository, and every
`#anchor` a heading of its target (GitHub's anchors), so moving a section cannot leave a dead link behind."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(p for p in ROOT.rglob("*.md")  # the repository's own: not a tool's (.pytest_cache/README.md) or a run's
              if not any(part.startswith(".") or part in ("runs", "node_modules") for part in p.relative_to(ROOT).parts))
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    text = FENCE.sub("", markdown.read_text())  # a `# comment` in a code block is not a heading
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_the_anchor_rule_matches_githubs():
    assert github_anchor("Policy-gradient RL (`rl.mode=grpo`)") == "policy-gradient-rl-rlmodegrpo"
    assert github_anchor("Real models: SD3 / SD3.5 (diffusers)") == "real-models-sd3--sd35-diffusers"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    dead = []
    for link in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists():
            dead.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            dead.append(f"{link}: no heading with that anchor in {target.relative_to(ROOT)}")
    assert not dead, dead
