"""Write tutorials/00_quickstart.ipynb (outputs stripped; the test suite executes it)."""

from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# lensprobe quick start\n\n"
        "lensprobe measures how information moves through a TransformerLens model. This notebook"
        " runs offline in well under a minute: it builds a small model, loads the shipped"
        " checkpoints, runs one analysis from each paper, and writes the HTML report.\n\n"
        "Every extractor takes a `HookedTransformer` (TL 2.x/3.x) or a `TransformerBridge`"
        " (TL 3.x/4.x) and leaves it exactly as it found it."
    ),
    nbf.v4.new_code_cell(
        "import torch\n"
        "import lensprobe as lp\n"
        "torch.set_num_threads(1)\n"
        "print(lp.BACKEND, lp.TL_VERSION)"
    ),
    nbf.v4.new_markdown_cell(
        "## Models\n`lp.tiny_model` builds a small model from plain options on whichever"
        " TransformerLens is installed; `lp.zoo` holds the project's trained checkpoints"
        " (portable `.safetensors` files that load on both backends)."
    ),
    nbf.v4.new_code_cell(
        "model = lp.tiny_model(n_layers=2, n_heads=4, d_model=64, d_vocab=50, n_ctx=64, positional='rotary')\n"
        "print(lp.zoo.names())\n"
        "retrieval = lp.zoo.load('retrieval')\n"
        "lp.zoo.info('retrieval')['query_accuracy_per_hops']"
    ),
    nbf.v4.new_markdown_cell(
        "## The extraction core\nInject a tensor at one hook, capture another, and take exact"
        " Jacobians; `lp.guard` freezes the model and restores it on exit."
    ),
    nbf.v4.new_code_cell(
        "tokens = torch.randint(0, 50, (1, 16))\n"
        "with lp.guard(model):\n"
        "    x0 = lp.run_hooked(model, tokens, ['blocks.0.hook_resid_pre'])['blocks.0.hook_resid_pre']\n"
        "    fn = lp.hooked_fn(model, tokens, 'blocks.0.hook_resid_pre', 'blocks.1.hook_resid_post',\n"
        "                      select=lambda y: y[:, -1])\n"
        "    J = lp.jacobian(fn, x0)\n"
        "J.shape  # [batch, d_model] x [batch, pos, d_model]"
    ),
    nbf.v4.new_markdown_cell("## One analysis per paper"),
    nbf.v4.new_code_cell(
        "sens = lp.sensitivity(model, tokens, progress=False)   # 1. over-squashing\n"
        "sens.plot();"
    ),
    nbf.v4.new_code_cell(
        "spec = lp.ov_spectrum(model, progress=False)            # 2. OV spectra and smoothing\n"
        "spec.to_dataframe().head()"
    ),
    nbf.v4.new_code_cell(
        "coup = lp.block_coupling(model, tokens, progress=False) # 3. block coupling\n"
        "print('mean off-diagonal coupling', coup.scalar())"
    ),
    nbf.v4.new_code_cell(
        "from lensprobe.tasks.retrieval import RetrievalTask       # 4. stacked heads\n"
        "task = RetrievalTask(**lp.zoo.info('retrieval')['task'])\n"
        "batch = task.sample(64, torch.Generator().manual_seed(0))\n"
        "stack = lp.stacked_heads(retrieval, batch)\n"
        "stack.stack"
    ),
    nbf.v4.new_code_cell(
        "stack.attention_view()"
    ),
    nbf.v4.new_code_cell(
        "from lensprobe.models import read_checkpoint_metadata      # 5. token-priority graph\n"
        "prio = lp.zoo.load('priority')\n"
        "extra = read_checkpoint_metadata(lp.zoo.path('priority'))['extra']\n"
        "tpg = lp.TokenPriorityGraph.from_data(extra['sequences'], extra['labels'],\n"
        "                                      vocab=lp.models.vocab_of(prio))\n"
        "lp.priority_alignment(prio, tpg).summary()"
    ),
    nbf.v4.new_markdown_cell(
        "## The report\n`lensprobe report` (or `make report`) runs every analysis and writes one"
        " self-contained HTML page plus a JSON of the headline numbers."
    ),
    nbf.v4.new_code_cell(
        "from lensprobe.report import run_report\n"
        "res = run_report(out='quickstart_report', progress=False, only=['smoothing'])\n"
        "print(res.html_path, [s.name for s in res.sections])"
    ),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
out = Path(__file__).resolve().parent.parent / "tutorials" / "00_quickstart.ipynb"
nbf.write(nb, out)
print("wrote", out)
