"""Pure tensor functions (no registration, no BasicSR): the math behind the non-local blocks."""
