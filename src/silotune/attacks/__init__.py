"""Privacy attacks: what each party of a silotune job can infer from what it observes."""
