"""The report's HTML: one Jinja2 template with autoescaping, so that every value from outside (a file name, an
error message, a summary field, model metadata) is escaped for its context by construction, never by
remembering to call an escape function. ``report.py`` gives ``render_page`` plain values (text, numbers,
data: URIs it made itself); names and errors have already been through ``text.visible`` there, so that
control and bidirectional characters show as escapes before the template escapes HTML.

The only markup not written in the template is the page's own CSS and script (constants of this module). The
Content-Security-Policy allows that one script by its SHA-256 hash: an injected ``<script>`` or event handler
would not run even if something were ever left unescaped.
"""

from __future__ import annotations

import base64
import hashlib

import jinja2
from markupsafe import Markup

__all__ = ["CSP", "render_page"]

# The page. Plain HTML and CSS first: the summary and every table read without JavaScript, and a matrix cell is a
# link to its images (shown by CSS :target); the script only keeps the page from jumping and marks the chosen cell.
_TEMPLATE = """\
{% macro figure(f) %}
<li><figure><div class="pics">
{%- if f.seen %}<img class="px" src="{{ f.seen }}" width="84" height="84" \
alt="What the model saw: {{ image_size }}x{{ image_size }} grayscale">{% endif %}
{%- if f.original %}<img class="orig{{ ' px' if f.small }}" src="{{ f.original }}" width="84" height="84" \
alt="The original image, {{ f.width }}x{{ f.height }} pixels">{% endif -%}
</div><figcaption><code class="path">{{ f.path }}</code><br>
{%- if f.truth is none %}predicted <b>{{ f.label }}</b> {{ f.score }}
{%- elif f.right %}true and predicted <b>{{ f.label }}</b> {{ f.score }}
{%- else %}<span class="bad">wrong:</span> true <b>{{ f.truth }}</b>, predicted <b>{{ f.label }}</b> {{ f.score }}
{%- endif %}
{%- if f.top %}<br>top {{ top_k }}: {% for label, score in f.top %}{{ label }} {{ score }}{{ ", " if not loop.last }}\
{% endfor %}{% endif %}
{%- if f.note %}<br><span class="note">{{ f.note }}</span>{% endif -%}
</figcaption></figure></li>
{%- endmacro %}
{% macro gallery(figures) %}
{% if figures %}<ul class="gallery">{% for f in figures %}{{ figure(f) }}{% endfor %}</ul>
{%- else %}<p>None.</p>{% endif %}
{% endmacro %}
{% macro kv(rows) %}
<table class="kv"><tbody>
{%- for row in rows %}<tr><th scope="row">{{ row.key }}</th><td>
{%- for text, code in row.parts %}{% if code %}<code>{{ text }}</code>{% else %}{{ text }}{% endif %}{% endfor -%}
</td></tr>{% endfor -%}
</tbody></table>
{% endmacro %}
<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{{ csp }}">
<link rel="icon" href="data:,">
<title>{{ name }}: classify report</title><style>{{ css }}</style></head><body>
<header><h1>Classify report: {{ name }}</h1><p class="sub">{{ files }} files, {{ classified }} classified, \
{{ failed }} failed{% if labelled %}, accuracy {{ accuracy }}%{% endif %}</p>
<dl class="glance">{% for item in glance %}<div><dt>{{ item.key }}</dt><dd>
{%- if item.small %}<span class="small">{{ item.value }}</span>{% else %}{{ item.value }}{% endif %}</dd></div>
{%- endfor %}</dl></header>
<nav aria-label="Sections">{% for id, text in nav %}<a href="#{{ id }}">{{ text }}</a>{% endfor %}</nav>
<main>
{% if confusion %}
<section id="confusion"><h2>Confusion matrix</h2>
<p>Rows: the true class (from the folder names); columns: the predicted class. Choose a cell to see its files \
(up to {{ cell_images }} each, a random sample of a larger cell).</p>
<div class="cm-wrap"><div class="cm-scroll"><table class="cm">\
<caption>Files by true class (rows) and predicted class (columns)</caption>
<thead><tr><th scope="col" class="corner">true \\ predicted</th>
{%- for name in class_names %}<th scope="col">
{%- for part in name.split("/") %}{% if not loop.first %}/<wbr>{% endif %}
{%- if "-" in part %}<span class="nw">{{ part }}</span>{% else %}{{ part }}{% endif %}{% endfor %}</th>
{%- endfor %}<th scope="col">recall</th></tr></thead><tbody>
{% for row in confusion.rows %}
<tr><th scope="row">{{ row.name }}</th>
{%- for c in row.cells %}
{%- if c.count %}<td style="background: {{ c.heat }}"><a class="cm-cell" href="#cell-{{ c.t }}-{{ c.p }}" \
aria-label="true {{ row.name }}, predicted {{ c.predicted }}: {{ c.count }} files">{{ c.count }}</a></td>
{%- else %}<td class="zero">0</td>{% endif %}
{%- endfor %}<td class="recall">{{ row.recall }}</td></tr>
{% endfor %}
</tbody></table></div>
<div id="cell-panel" role="region" aria-label="Files of the chosen cell" tabindex="-1">
<p id="cell-status" aria-live="polite">Choose a cell of the matrix to see its files here.
{%- with h = confusion.hint %}{% if h %} The most frequent mistake: <a href="#cell-{{ h.t }}-{{ h.p }}" \
class="cm-cell">true {{ h.true }}, predicted {{ h.predicted }}</a> ({{ h.count }} files).{% endif %}{% endwith %} \
{{ legend }}</p>
{% for cell in confusion.cells %}
<section class="cell" id="cell-{{ cell.t }}-{{ cell.p }}" data-count="{{ cell.n }}"><h3>True {{ cell.true }}, \
predicted {{ cell.predicted }}: {{ cell.count }} files</h3><p class="count">{{ cell.shown }} shown, least confident \
first{% if cell.left %}; {{ cell.left }} more not in this report (see the table){% endif %}.</p>
{{ gallery(cell.figures) }}</section>
{% endfor %}
</div></div></section>
{% endif %}
<section id="per-class"><h2>Per class</h2>
{% if labelled %}
<p>Accuracy <strong>{{ accuracy }}%</strong> on {{ per_class.labelled }} labelled files. Precision: of the files \
predicted as the class, the share that is; recall: of the files of the class, the share predicted as it.</p>
{% else %}
<p>Not every file is in a folder named after a class (the ImageFolder layout), so there is no accuracy: only what \
was predicted.</p>
{% endif %}
<table class="num"><thead><tr><th scope="col">class</th><th scope="col">predicted</th>
{%- if labelled %}<th scope="col">files</th><th scope="col">precision</th><th scope="col">recall</th>{% endif -%}
</tr></thead><tbody>
{% for row in per_class.rows %}
<tr><th scope="row">{{ row.name }}</th><td>{{ row.predicted }}</td>
{%- if labelled %}<td>{{ row.support }}</td><td>{{ row.precision }}</td><td>{{ row.recall }}</td>{% endif %}</tr>
{% endfor %}
</tbody></table></section>
{% if misclassified %}
<section id="misclassified"><h2>Misclassified, most confident first</h2>
<p>{{ misclassified.shown }} of {{ misclassified.total }} misclassified files: the ones the model was surest of. \
{{ legend }}</p>
{{ gallery(misclassified.figures) }}</section>
{% endif %}
<section id="unsure"><h2>Least confident predictions</h2>
<p>The {{ unsure.shown }} lowest top-1 scores of {{ classified }} classified files. {{ legend }}</p>
{{ gallery(unsure.figures) }}</section>
<section id="failed"><h2>Failed files ({{ failed }})</h2>
{% if not failures.rows %}
<p>Every file was read and classified.</p>
{% else %}
{% if failures.more %}
<p>The first {{ failures.listed }} of {{ failed }}; every one has its row in the table, with its error.</p>
{% endif %}
{% if failures.kinds %}
<table class="num errors"><caption>Errors by message</caption><thead><tr><th scope="col">error</th>\
<th scope="col">files</th></tr></thead><tbody>
{%- for text, n in failures.kinds %}<tr><th scope="row">
{%- if text is none %}<i>other messages</i>{% else %}{{ text }}{% endif %}</th><td>{{ n }}</td></tr>{% endfor -%}
</tbody></table>
{% endif %}
<table class="failed"><caption>Failed files and their errors</caption><thead><tr><th scope="col">file</th>\
<th scope="col">error</th></tr></thead><tbody>
{%- for path, error in failures.rows %}<tr><td><code class="path">{{ path }}</code></td><td>{{ error }}</td></tr>
{%- endfor %}</tbody></table>
{% endif %}
</section>
<section id="run"><h2>Run</h2>
{{ kv(run_rows) }}</section>
<section id="model"><h2>Model</h2>
{% if model_rows is none %}
<p>No model given: <code>fmnist-onnx report PREDICTIONS -m MODEL</code> adds its metadata.</p>
{% else %}
{{ kv(model_rows) }}
{% endif %}
</section></main>
<footer>Made by fmnist-onnx from {{ source }}. Samples: up to {{ cell_images }} files per matrix cell, \
{{ gallery_images }} per gallery, {{ failed_listed }} failed files.</footer>
<script>{{ script }}</script></body></html>
"""

_CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg2: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); }
main, header, nav { max-width: 1440px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 16px; margin: 0 0 4px; }
p { margin: 6px 0; max-width: 90ch; }
.sub { color: var(--muted); margin: 0; }
nav { padding-top: 8px; padding-bottom: 8px; }
nav a { margin-right: 14px; }
a { color: var(--accent); }
a:focus-visible, [tabindex]:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; border-radius: 2px; }
dl.glance { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0 0; }
dl.glance div { border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 120px; }
dl.glance dt { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
dl.glance dd { margin: 0; font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
dl.glance dd .small { font-size: 16px; }
.nw { white-space: nowrap; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
thead th { background: var(--bg2); }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
table.num td { text-align: right; }
table.errors, table.failed { margin-top: 12px; }
table.kv th { background: var(--bg2); font-weight: 600; white-space: nowrap; }
.cm-wrap { display: grid; grid-template-columns: minmax(0, auto) minmax(0, 1fr); gap: 24px; align-items: start; }
@media (max-width: 1250px) { .cm-wrap { grid-template-columns: minmax(0, 1fr); } }
.cm-scroll { overflow-x: auto; }
table.cm caption { font-weight: 400; color: var(--muted); font-size: 13px; }
table.cm th { font-size: 13px; }
table.cm tbody th { padding: 6px 8px; }
table.cm thead th { width: 64px; vertical-align: bottom; text-align: center; }
table.cm thead th.corner { width: auto; text-align: left; color: var(--muted); font-weight: 400; }
table.cm td { padding: 0; text-align: right; min-width: 58px; }
table.cm td.zero { color: #8c959f; padding: 6px 8px; }
table.cm td.recall { padding: 6px 8px; color: var(--muted); }
a.cm-cell { display: block; padding: 6px 8px; color: var(--fg); text-decoration: none; }
a.cm-cell:hover { text-decoration: underline; }
table.cm a[aria-current="true"] { box-shadow: inset 0 0 0 3px var(--fg); font-weight: 700; }
#cell-panel { min-width: 0; }
#cell-status { color: var(--muted); }
#cell-status a.cm-cell { display: inline; padding: 0; color: var(--accent); text-decoration: underline; }
.cell { display: none; }
.cell:target { display: block; }
#cell-panel:has(.cell:target) #cell-status { display: none; }
.js .cell, .js .cell:target { display: none; }
.js .cell.shown { display: block; }
.count { color: var(--muted); font-size: 13px; }
ul.gallery { list-style: none; margin: 8px 0 0; padding: 0; display: grid; gap: 10px;
  grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); }
figure { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px; height: 100%; }
.pics { display: flex; gap: 6px; }
.pics img { width: 84px; height: 84px; background: var(--bg2); object-fit: contain; }
.pics img.px { image-rendering: pixelated; background: #000; }
.pics img.orig.px { background: var(--bg2); }
figcaption { font-size: 12.5px; margin-top: 6px; }
code.path { font-size: 11.5px; color: var(--muted); word-break: break-all; }
table.failed code.path { font-size: 13px; color: var(--fg); }
table.errors th { font-weight: 400; background: none; }
.sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
.bad { color: #b42318; font-weight: 600; }
.note { color: #9a6700; }
footer { max-width: 1440px; margin: 32px auto; padding: 0 24px; color: var(--muted); font-size: 13px; }
"""

_SCRIPT = """
(function () {
  // Without this script a cell's link shows its files through CSS :target (the page jumps there);
  // with it, the files show in place, the chosen cell is marked, and the status line says what is shown.
  document.documentElement.classList.add("js");
  var panel = document.getElementById("cell-panel");
  if (!panel) return;
  var status = document.getElementById("cell-status");
  var first = status.innerHTML;
  var sections = panel.querySelectorAll("section.cell");
  var links = document.querySelectorAll("a.cm-cell");
  function show(id) {
    var shown = null;
    sections.forEach(function (s) { var on = s.id === id; s.classList.toggle("shown", on); if (on) shown = s; });
    document.querySelectorAll("table.cm a.cm-cell").forEach(function (a) {
      if (a.getAttribute("href") === "#" + id) a.setAttribute("aria-current", "true");
      else a.removeAttribute("aria-current");
    });
    // the section's heading says what is shown; the status line says it again to screen readers only
    if (shown) status.textContent = "Showing " + shown.querySelector("h3").textContent + ".";
    else status.innerHTML = first;
    status.classList.toggle("sr-only", !!shown);
    return shown;
  }
  links.forEach(function (a) {
    a.addEventListener("click", function (ev) {
      ev.preventDefault();
      var id = a.getAttribute("href").slice(1);
      history.replaceState(null, "", "#" + id);
      var shown = show(id);
      if (shown && shown.getBoundingClientRect().top > window.innerHeight) shown.scrollIntoView();
    });
  });
  window.addEventListener("hashchange", function () { show(location.hash.slice(1)); });
  if (location.hash.indexOf("#cell-") === 0) show(location.hash.slice(1));
})();
"""


def _hash(source: str) -> str:
    """The CSP source that allows an inline script or style whose text is exactly ``source``."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


# no request leaves the page: images are data: URIs, style and script are inline; the one script by its hash
# (inline style attributes, the matrix's heat, still need 'unsafe-inline' for styles: CSS cannot run script)
CSP = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {_hash(_SCRIPT)}; "
       "base-uri 'none'; form-action 'none'")

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=True)
_PAGE = _ENV.from_string(_TEMPLATE)


def render_page(**context) -> str:
    """The page's HTML text from the plain values ``report.render`` gathers (each escaped here)."""
    return _PAGE.render(css=Markup(_CSS), script=Markup(_SCRIPT), csp=CSP, **context)
