"""MkDocs hooks (mkdocs.yml `hooks:`): the configuration reference page is rendered from the schemas at
build time, so it cannot drift from the code."""

from conceptlab.cli import reference_markdown

MARKER = "<!-- configuration-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, reference_markdown()) if MARKER in markdown else markdown
