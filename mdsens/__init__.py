"""mdsens: sensitivities of mechanical equilibria by implicit differentiation."""
