"""Hospital side: the Flower ClientApp and what it does with its own records."""
