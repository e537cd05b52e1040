"""Topic modelling (stage 01): documents, the modeler, the fitted model, quality, the result."""
