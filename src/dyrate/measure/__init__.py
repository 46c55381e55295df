"""Measurement: what a policy costs. `flops` (the FLOPs and KV-cache model under named conventions),
`trace` (per-token records of a run -> trace, FLOPs ratios, retained image tokens), `bench`
(measured time and memory side by side), `findk` (VTW's choice of the withdrawal layer)."""
