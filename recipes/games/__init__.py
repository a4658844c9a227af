"""Games: equilibrium finding in extensive-form games (CFR on Kuhn poker)."""
