"""The export: users' feedback -> an XTuner fine-tuning dataset (selection, records, writer,
XTuner config, dataset card)."""
