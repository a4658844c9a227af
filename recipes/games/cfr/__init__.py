"""Counterfactual regret minimisation (Zinkevich et al., 2007) on Kuhn poker."""
