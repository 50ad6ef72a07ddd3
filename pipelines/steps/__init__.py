"""Cleaning steps, one file each. REPAIRS run on every record's fields; CORPUS_STEPS are opted into per corpus (`steps:`)."""

from pipelines.steps.control_chars import ControlChars
from pipelines.steps.dedent import Dedent
from pipelines.steps.html_entities import HtmlEntities
from pipelines.steps.mojibake import Mojibake
from pipelines.steps.newlines import Newlines
from pipelines.steps.page_headers import PageHeaders

# Order matters: line endings first; ftfy before entities (an escaped `&amp;` inside mojibake stays visible to ftfy) and
# before control characters (C1 controls standing for cp1252 bytes are mojibake, not noise, until ftfy has seen them).
REPAIRS = {"newlines": Newlines, "mojibake": Mojibake, "html": HtmlEntities, "control": ControlChars}
CORPUS_STEPS = {"dedent": Dedent, "strip_page_headers": PageHeaders}
