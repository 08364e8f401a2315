"""The output half of bench: what a run leaves and what is made from it.

- `records`: the result record (one JSON file per suite, model, data and seed), its protocol fingerprint,
  provenance, validation and the one loader (`load_records`);
- `tables`: records as tables (rich, Markdown, LaTeX, CSV, HTML), `bench table`;
- `published`: the papers' published numbers, shown beside comparable reproduced ones;
- `report`: one self-contained HTML report of the tables and figures, `bench report`;
- `gate`: the regression gate, `bench compare`;
- `baselines`: approved baselines for the gate, `bench baseline update`.
"""
