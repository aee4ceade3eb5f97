"""report.html (memorize/audit/report.py): one page, tables, inline images, every text escaped, headings in words;
on an audit of a tiny GPT-2 built here against another (random weights, nothing downloaded)."""

import html.parser

import pytest
import torch

from memk.bench.audit_demo import char_tokenizer, new_gpt2, random_texts
from memk.memorize.audit.audit import AuditSettings, audit

transformers = pytest.importorskip("transformers")
SCRIPT = "<script>alert('memorized')</script> & co"


@pytest.fixture(scope="module")
def finetuned_audit(tmp_path_factory):
    """An audit with a reference, its report written, one non-member holding a <script> tag."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    tokenizer = char_tokenizer()
    for name, seed in (("model", 1), ("reference", 2)):
        new_gpt2(len(tokenizer), 64, seed, d_model=16, layers=1, heads=2).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    members, nonmembers = random_texts(6, 20, seed=3), random_texts(6, 20, seed=4)
    result = audit(str(root / "model"), members, nonmembers + [SCRIPT], reference=str(root / "reference"),
                   out=root / "out", settings=AuditSettings(bootstrap=20, top=100), progress=False)
    return result, root / "out"


class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_one_page_with_tables_inline_images_and_escaped_text(finetuned_audit):
    _, out = finetuned_audit
    page_html = (out / "report.html").read_text()
    page = Page()
    page.feed(page_html)
    page.close()
    assert page.tags.count("table") >= 4  # models, sets, attacks, top samples
    assert len(page.images) == 2 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert "script" not in page.tags  # the sample's <script> is text, not a tag
    assert SCRIPT in "".join(page.text)
    assert "&lt;script&gt;" in page_html and "<script>" not in page_html


def test_the_report_has_a_page_margin_and_headings_in_words(finetuned_audit):
    import re

    result, out = finetuned_audit
    page = (out / "report.html").read_text()
    headings = re.findall(r"<h[23]>(.*?)</h[23]>", page)
    count = len(result.summary["top"])
    assert f"Top {count} most-memorized samples (unintended memorization, bits)" in headings
    assert not [h for h in headings if "_" in h]  # no field names
    assert re.search(r"body \{[^}]*padding: 0 2em", page)
