"""Federated training: iALS whose user data and user vectors stay on the clients
(:mod:`jaxreco.federated.ials`), run on Flower (:mod:`jaxreco.federated.flower`);
:mod:`jaxreco.federated.simulate` runs it next to the central trainer."""
