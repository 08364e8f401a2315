"""The output half of bench: what a run leaves and what is made from it.

- `record`: the typed result record (`Record`, `MetricEntry`), its JSON round trip, schema version and the
  upgrade of version-1 records;
- `records`: records on disk (one JSON file per suite, model, data and seed): the protocol fingerprint,
  provenance, the atomic write and the one loader (`load_records`);
- `tables`: records as tables (rich, Markdown, LaTeX, CSV, HTML), `bench table`;
- `published`: the papers' published numbers, shown beside comparable reproduced ones;
- `report`: one self-contained HTML report of the tables and figures, `bench report`;
- `gate`: the regression gate, `bench compare`;
- `baselines`: approved baselines for the gate, `bench baseline update`.
"""
