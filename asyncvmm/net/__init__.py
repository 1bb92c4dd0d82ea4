"""Host networking: tap devices (``tap``) and namespace/interface helpers (``netns``)."""
