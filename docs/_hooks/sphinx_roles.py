"""mkdocs hook: the docstrings' Sphinx roles (:class:`~keylock.X`) as code, linked when the
target is documented on the same page (mkdocstrings renders the roles as plain text)."""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|meth|func|data|attr|exc|mod):<code>(~?)([\w.]+)</code>")


def on_page_content(html: str, **_: object) -> str:
    ids = set(re.findall(r'id="([\w.]+)"', html))

    def replace(match: re.Match[str]) -> str:
        short, target = match[1], match[2]
        shown = target.rsplit(".", 1)[-1] if short else target
        code = f"<code>{shown}</code>"
        return f'<a href="#{target}">{code}</a>' if target in ids else code

    return _ROLE.sub(replace, html)
