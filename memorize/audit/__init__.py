"""memk.memorize.audit: per-sample memorization of any causal LM, in bits (`memk audit`). Contract:
audit.py takes models and texts and writes samples.jsonl, samples.csv, audit.json and report.html;
models.py loads the models (Hugging Face, PEFT adapters, memk checkpoints), scoring.py codes the
texts, attacks.py and recall_dc_pdd.py score membership, references.py compares several references,
extraction.py decodes members back, risk.py sets capacity against the members, gate.py is --fail-if,
records.py and report.py write the outputs. It trains nothing and uses no executor."""
