"""PIE-Bench (the PnP-Inversion / Direct-Inversion editing benchmark) in the sweep: its folder (data), the official
metrics (metrics), the toy world in its layout (export), the per-image rows and outputs (score) and the summaries
(report). ``diffedit sweep --images piebench:DIR`` runs it; docs/piebench.md says how to get the data and weights."""
