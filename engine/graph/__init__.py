"""Attribution graphs over transcoders (circuit-tracer's definitions, docs/graphs.md): the local replacement model of
one prompt (frozen attention patterns and norm scales, each MLP a transcoder plus a constant error), edge weights by
batched backward passes, pruning by influence, replacement and completeness scores, and the graph files."""
