"""End-to-end recipes wiring data, models, objectives, the loop and evaluation."""
