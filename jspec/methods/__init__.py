"""One module per speculative method, each a strategy of the protocol in `jspec.rounds`:
`chain` (Chain), `static_tree` (StaticTree), `sequoia` (SequoiaTree), `dynamic_tree`
(DynamicTree), `rsd` (RSD), `eagle_tree` (EagleTree), `multi_candidate` (MultiCandidate) and
`early_stop` (the learned and confidence-based stop rules MCSD and `Chain(stop=...)` use),
`prompt_lookup` (PromptLookup), `rest` (Rest), `rasd` (RASD), `adaptive` (AdaptiveK) and
`smartspec` (SmartSpec). Adding a method is adding a module here; the decode loop does not change."""
