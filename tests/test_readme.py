"""The README's layout section names every module of the package, and only files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_layout_matches_the_package_files():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    named = set(re.findall(r"diffxattn/[\w/]+\.py|diffxattn/\w+/(?=\s)", block))
    named |= {f"diffxattn/{m}" for m in re.findall(r"(?<![/\w])(\w+\.py)\b", block)}  # "(checkpoint.py: ...)"
    assert all((ROOT / path).exists() for path in named), sorted(p for p in named if not (ROOT / p).exists())
    package = ROOT / "diffxattn"
    modules = {f"diffxattn/{p.name}" for p in package.glob("*.py") if p.name != "__init__.py"}
    modules |= {f"diffxattn/{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    modules -= {"diffxattn/editing.py", "diffxattn/prompts.py"}  # old names, kept as aliases (said below it)
    covered = {m for m in modules if m in named or any(n.startswith(m) for n in named)}
    assert covered == modules, sorted(modules - covered)
    assert "`diffxattn.editing` and `diffxattn.prompts` are the old names" in readme
