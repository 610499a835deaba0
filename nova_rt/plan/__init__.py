"""Parallel layout planner (`nova-rt plan`): memory per GPU (static part exact, checked against the backends'
allocations on CPU) and step time from a roofline, for a config's model and stage on a GPU cluster. docs/plan.md."""
