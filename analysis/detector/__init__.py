"""The GDPR Art. 9 sensitive-topic detector: text, features, the model (fit / cross_fit / detect / predict_proba / save / load), evaluation."""
