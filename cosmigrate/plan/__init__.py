"""`cosmigrate plan`: what the migration will take before it starts (see planner)."""
