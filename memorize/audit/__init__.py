"""memk.memorize.audit: per-sample memorization of any causal LM, in bits (`memk audit`). Contract:
audit.py takes models and texts and writes samples.jsonl, samples.csv, audit.json and report.html, as
settings.py's AuditSettings say; texts.py reads the texts; models.py loads the models (Hugging Face, PEFT
adapters, memk checkpoints) as scoring_model.py's ScoringModel; scoring.py codes the texts; attacks.py and
recall_dc_pdd.py score membership, references.py compares several references, extraction.py decodes members
back, risk.py sets capacity against the members, gate.py is --fail-if; row_store.py keeps the rows an audit
resumes from, summary.py makes audit.json's summary and the printed table, records.py and report.py write the
other outputs. It trains nothing and uses no executor."""
