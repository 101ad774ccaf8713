"""Reverse: Braze's webhook steps and Currents, read backwards by the rules, sent to Didomi."""
