"""Cleaning steps, one file each. REPAIRS run on every record's fields; CORPUS_STEPS are opted into per corpus (`steps:`)."""

from textmill.pipelines.steps.control_chars import ControlChars
from textmill.pipelines.steps.dedent import Dedent
from textmill.pipelines.steps.html_entities import HtmlEntities
from textmill.pipelines.steps.mojibake import Mojibake
from textmill.pipelines.steps.newlines import Newlines
from textmill.pipelines.steps.page_headers import PageHeaders

# Order matters: line endings first; ftfy before entities (an escaped `&amp;` inside mojibake stays visible to ftfy) and
# before control characters (C1 controls standing for cp1252 bytes are mojibake, not noise, until ftfy has seen them).
REPAIRS = {"newlines": Newlines, "mojibake": Mojibake, "html": HtmlEntities, "control": ControlChars}
CORPUS_STEPS = {"dedent": Dedent, "strip_page_headers": PageHeaders}
